"""The audit: one entry point for both layouts.

- moeprune's own layout (``manifest.json``): every check of ``invoke verify``
  (:func:`moeprune.verify.verify`) becomes a row of the audit; nothing is re-implemented.
- the seed's layout (``expert_drop_metadata.json`` with ``per_layer_keep``, ``gpqa_results/``,
  a README card): checks (a)-(d) of :mod:`moeprune.audit.seed` and :mod:`moeprune.audit.claims`.
- either, with ``--reprofile RECIPE``: (e) of :mod:`moeprune.audit.reprofile`.

A Hub repo id (``owner/name``, optionally ``owner/name@revision``) is audited from a download.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from moeprune.audit.report import AuditReport
from moeprune.audit.seed import AuditError, is_seed_layout
from moeprune.errors import MoepruneError


def split_revision(source: str, revision: str | None) -> tuple[str, str | None]:
    """``owner/name@rev`` -> (``owner/name``, ``rev``); an explicit ``revision`` wins."""
    if "@" in source and not Path(source).expanduser().exists():
        repo, _, at = source.partition("@")
        return repo, revision or at or None
    return source, revision


@contextlib.contextmanager
def _downloaded(repo_id: str, revision: str | None, endpoint: str | None) -> Iterator[Path]:
    from huggingface_hub import snapshot_download

    from moeprune.publish import DEFAULT_ENDPOINT, redact, resolve_token

    endpoint = endpoint or DEFAULT_ENDPOINT
    token = resolve_token(None)
    with tempfile.TemporaryDirectory(prefix="moeprune-audit-") as tmp:
        try:
            path = Path(snapshot_download(repo_id, revision=revision, local_dir=Path(tmp) / "artifact",
                                          endpoint=endpoint, token=token or False))
        except Exception as exc:  # noqa: BLE001 - network/Hub failures become one clear message
            raise AuditError(f"could not download {repo_id} from {endpoint}: "
                             f"{redact(f'{type(exc).__name__}: {exc}', token)}") from None
        yield path


def _hub_has_manifest(repo_id: str, revision: str | None, endpoint: str | None) -> bool:
    from huggingface_hub import HfApi

    from moeprune.publish import DEFAULT_ENDPOINT, redact, resolve_token

    token = resolve_token(None)
    try:
        files = HfApi(endpoint=endpoint or DEFAULT_ENDPOINT, token=token or False).list_repo_files(
            repo_id, revision=revision)
    except Exception as exc:  # noqa: BLE001
        raise AuditError(f"could not list {repo_id} on {endpoint or DEFAULT_ENDPOINT}: "
                         f"{redact(f'{type(exc).__name__}: {exc}', token)}") from None
    return "manifest.json" in files


def audit(source: str, base: Path | None = None, *, reprofile: Path | None = None, revision: str | None = None,
          endpoint: str | None = None) -> AuditReport:
    """Audit ``source`` (a directory or a Hub repo id) and return the table of checks."""
    source, revision = split_revision(source, revision)
    local = Path(source).expanduser()
    base = Path(base).expanduser() if base is not None else None
    if base is not None and not (base / "config.json").is_file():
        raise AuditError(f"--base {base}: no config.json there; pass the base model's directory")
    if reprofile is not None and not Path(reprofile).is_file():
        raise AuditError(f"--reprofile {reprofile}: recipe file not found")
    subject = source + (f"@{revision}" if revision else "")
    if local.exists():
        if not local.is_dir():
            raise AuditError(f"{local}: not a directory; pass the artifact's directory or a Hub repo id")
        return audit_directory(local, base, reprofile=reprofile, subject=subject)
    if _hub_has_manifest(source, revision, endpoint):
        return _audit_moeprune(source, local_root=None, base=base, reprofile=reprofile, subject=subject,
                               revision=revision, endpoint=endpoint)
    with _downloaded(source, revision, endpoint) as path:
        return audit_directory(path, base, reprofile=reprofile, subject=subject)


def audit_directory(root: Path, base: Path | None = None, *, reprofile: Path | None = None,
                    subject: str | None = None) -> AuditReport:
    """Audit a local artifact directory of either layout."""
    root = Path(root)
    subject = subject or str(root)
    if (root / "manifest.json").is_file():
        return _audit_moeprune(str(root), local_root=root, base=base, reprofile=reprofile, subject=subject)
    if is_seed_layout(root):
        return _audit_seed(root, base, reprofile, subject)
    raise AuditError(
        f"{root}: neither layout: no manifest.json (moeprune) and no expert_drop_metadata.json with "
        "per_layer_keep / per_layer_drop (the seed's); pass a pruned model's directory or Hub repo id"
    )


# --- moeprune's layout: invoke verify's checks ---------------------------------------------------
def _audit_moeprune(target: str, *, local_root: Path | None, base: Path | None, reprofile: Path | None,
                    subject: str, revision: str | None = None, endpoint: str | None = None) -> AuditReport:
    from moeprune.verify import verify

    checked = verify(target, base, endpoint=endpoint, revision=revision)
    report = AuditReport(subject, "moeprune")
    for check in checked.checks:
        status = "not checked" if check.ok is None else "pass" if check.ok else "fail"
        report.add("verify", check.name, check.target, status, detail=check.detail)
    if reprofile is not None:
        if local_root is None:
            with _downloaded(target, revision, endpoint) as path:
                _reprofile_moeprune(report, path, reprofile)
        else:
            _reprofile_moeprune(report, local_root, reprofile)
    return report


def _reprofile_moeprune(report: AuditReport, root: Path, recipe: Path) -> None:
    from moeprune.audit.reprofile import reprofile as run_reprofile

    path = root / "expert_drop_metadata.json"
    drop_map = json.loads(path.read_text(encoding="utf-8"))
    keep = {entry["layer"]: entry["keep"] for entry in drop_map["layers"]}
    retained = run_reprofile(report, recipe, keep, drop_map.get("strategy"), path.name)
    measure = (drop_map.get("summary") or {}).get("retention_measure", "contribution_sum")
    for entry in drop_map["layers"]:
        ours = retained.get(f"retained/L{entry['layer']}")
        if ours is None:
            continue
        report.compare("e", f"retained/L{entry['layer']}", f"{path.name}: layers[{entry['layer']}].retained_fraction",
                       entry["retained_fraction"], ours[0], abs(entry["retained_fraction"] - ours[0]) <= 1e-9,
                       f"{measure} in the drop map; {ours[1]}")


# --- the seed's layout ---------------------------------------------------------------------------
def _audit_seed(root: Path, base: Path | None, reprofile: Path | None, subject: str) -> AuditReport:
    from moeprune.audit.claims import parse_card
    from moeprune.audit.seed import check_against_base, check_drop_metadata, check_eval, read_seed_drop_map

    report = AuditReport(subject, "seed")
    seed = read_seed_drop_map(root)
    check_drop_metadata(report, root, seed)
    check_against_base(report, root, seed, base)
    evals = check_eval(report, root)
    recomputed, missing = seed_recomputed_values(root, base, evals)
    if reprofile is not None:
        from moeprune.audit.reprofile import reprofile as run_reprofile

        keep = seed.keep or {layer: sorted(set(range(seed.original_experts or 0)) - set(drop))
                             for layer, drop in seed.drop.items()}
        recomputed.update(run_reprofile(report, reprofile, keep, seed.method, seed.path.name))
    else:
        report.not_checked("e", "re-profile with the claimed method", seed.path.name,
                           "pass --reprofile RECIPE to re-run the profile and compare the kept sets")
    readme = root / "README.md"
    if not readme.is_file():
        report.not_checked("d", "card claims", "README.md", "no README.md in the artifact")
        return report
    claims, unparsed = parse_card(readme.read_text(encoding="utf-8"), "README.md")
    from moeprune.audit.claims import compare_claims

    compare_claims(report, claims, unparsed, recomputed, missing)
    return report


def seed_recomputed_values(root: Path, base: Path | None, evals: list[Any]) -> tuple[dict[str, tuple[float, str]],
                                                                                      dict[str, str]]:
    """Every value a card claim can be compared with, from the artifact (and the base)."""
    from moeprune.arch import inspect
    from moeprune.card.numbers import checkpoint_facts

    values: dict[str, tuple[float, str]] = {}
    missing = {
        "base.accuracy/*": "the artifact has no sample logs of the base model",
        "base.stderr/*": "the artifact has no sample logs of the base model",
        "retained/*": "needs --reprofile RECIPE (per-layer retention comes from a profile)",
    }
    if evals:
        chosen = next((e for e in evals if "gpqa" in e.task), evals[0])
        origin = chosen.sample_log.name
        for filter_name, metrics in chosen.scores.items():
            score = metrics.get(chosen.error_analysis["metric"]) or next(iter(metrics.values()))
            values[f"accuracy/{filter_name}"] = (score["value"], origin)
            if score["stderr"] is not None:
                values[f"stderr/{filter_name}"] = (score["stderr"], origin)
        analysis = chosen.error_analysis
        for key in ("correct", "wrong", "invalid", "correct_fraction", "wrong_fraction", "invalid_fraction"):
            values[key] = (analysis[key], f"{origin} ({analysis['filter']})")
        values["questions"] = (analysis["total"], origin)
        canary = analysis["canary"]
        for key in ("looping", "empty", "truncated"):
            if canary[key] is not None:
                values[key] = (canary[key], f"{origin} (loop canary)")
            else:
                missing[key] = "the sample log does not record finish_reason"
        letters = set("ABCD") | set(analysis["target_letters"]) | set(analysis["wrong_answer_letters"])
        for letter in letters:
            values[f"wrong_letter/{letter}"] = (analysis["wrong_answer_letters"].get(letter, 0), origin)
        lengths = analysis["response_length"]
        if lengths["count"]:
            values["median_chars"] = (lengths["median_chars"], origin)
            values["mean_chars"] = (lengths["mean_chars"], origin)
            values["median_tokens"] = (lengths["median_tokens_approx"], f"{origin} (chars / {lengths['chars_per_token']})")
            values["mean_tokens"] = (lengths["mean_tokens_approx"], f"{origin} (chars / {lengths['chars_per_token']})")
            for mark, count in lengths["over_chars"].items():
                values[f"over_{mark}"] = (count, origin)
    else:
        for key in ("accuracy/*", "stderr/*"):
            missing[key] = "no sample log to recompute it from"

    def model_values(directory: Path, prefix: str, label: str) -> None:
        try:
            spec = inspect(directory)
            facts = checkpoint_facts(directory)
        except (OSError, ValueError, MoepruneError):
            return
        experts = spec.num_experts_stated
        if isinstance(experts, int):
            values[prefix + "experts_per_layer"] = (experts, f"{label} config.json: {spec.num_experts_key}")
        for key, name in (("num_layers", "num_hidden_layers"),
                          ("hidden_size", "hidden_size"), ("moe_intermediate_size", "moe_intermediate_size"),
                          ("intermediate_size", "intermediate_size"), ("vocab_size", "vocab_size")):
            number = spec.text_int(name)
            if number is not None:
                values[prefix + key] = (number, f"{label} config.json: {name}")
        top_k = spec.top_k
        if isinstance(top_k, int):
            values[prefix + "top_k"] = (top_k, f"{label} config.json")
        values[prefix + "total_params"] = (facts.params, f"{label} safetensors headers")
        values[prefix + "safetensors_gib"] = (facts.files_bytes, f"{label} shard sizes (GiB = 2^30 bytes)")

    model_values(root, "", "artifact")
    if base is not None:
        model_values(base, "base.", "--base")
    else:
        for key in ("experts_per_layer", "top_k", "total_params", "safetensors_gib", "num_layers"):
            missing[f"base.{key}"] = "needs --base BASE"
    return values, missing
