"""``invoke verify``: an auditor's check of a published artifact (or a local run).

From the artifact alone (plus, optionally, the base checkpoint) it:

1. validates ``manifest.json`` and re-hashes every file it lists (size and sha256); files present
   but not listed are failures too;
2. validates every JSON artifact against its schema;
3. recomputes ``eval/results.json`` from the per-sample logs and compares every number, and
   re-scores every sample with its task's own filters and metric (``moeprune.eval.rescore``);
4. checks the drop map against the weight shapes and ``config.json``, and against the profile
   statistics it was made from (sha256); recomputes ``profile/profile.json``'s findings; re-derives
   every layer's keep set and retained fraction from the statistics with the drop-map stage's own
   selection (a ``manual`` map: its retained fractions only), and compares the card's retention
   numbers with them;
5. recomputes every number of the card from the artifacts, compares it with
   ``card_numbers.json``, and re-renders the card text to compare it with ``README.md`` line by line;
6. with ``--base``, checks every kept expert bit-exact against the base (and the base's
   parameter count and size as the card states them);
7. follows the chain of custody (:mod:`moeprune.custody`): every converted GGUF's record names the
   sha256 of the safetensors it was converted from (the published shards; the base's with
   ``--base``), every quantized GGUF's record its input GGUF, and every ``eval/<model>/run.json``
   the GGUF it served; an unquantized GGUF at hand has its expert tensors compared with the
   safetensors bit for bit (:mod:`moeprune.gguf_match`).

Manifest paths that are absolute or leave the artifact (``..``) are refused, never read. Code
(``*.py``, ``auto_map``) and pickle files in the artifact are listed as a warning: nothing here
runs or unpickles them, but an auditor should know they are there. A Hub repo id is first
downloaded with ``snapshot_download`` into a temporary directory; its GGUF repository is checked
remotely (sha256 of each file from the Hub's file listing; its small ``README.md`` and
``*.gguf.json`` records are downloaded).

Each check is one row of the report; any failure names the file and the value that disagrees.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moeprune.errors import MoepruneError
from moeprune.hashing import sha256_file
from moeprune.layout import SEQUENCES_NAME, RunLayout
from moeprune.manifest import MANIFEST_NAME, SCHEMA_OF, artifact_files
from moeprune.recalibrate import RECORD_NAME

_IGNORED_LOCAL = {MANIFEST_NAME, ".gitattributes"}
_MAX_DETAILS = 8


class VerifyError(MoepruneError):
    """The artifact could not be verified at all (not found, not a moeprune artifact)."""


@dataclass
class Check:
    name: str
    target: str
    ok: bool | None  # None: skipped (or, with ``warning``, a finding that does not fail the audit)
    detail: str = ""
    warning: bool = False


@dataclass
class VerifyReport:
    subject: str
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(check.ok is not False for check in self.checks)

    @property
    def failures(self) -> list[Check]:
        return [check for check in self.checks if check.ok is False]

    @property
    def warnings(self) -> list[Check]:
        return [check for check in self.checks if check.warning]

    def warn(self, name: str, target: str, findings: list[str]) -> None:
        shown = findings[:_MAX_DETAILS]
        more = f"\n… and {len(findings) - _MAX_DETAILS} more" if len(findings) > _MAX_DETAILS else ""
        self.checks.append(Check(name, target, None, "\n".join(shown) + more, warning=True))

    def add(self, name: str, target: str, problems: list[str], passed: str = "", skipped: str | None = None) -> None:
        if skipped is not None:
            self.checks.append(Check(name, target, None, skipped))
        elif problems:
            shown = problems[:_MAX_DETAILS]
            more = f"\n… and {len(problems) - _MAX_DETAILS} more" if len(problems) > _MAX_DETAILS else ""
            self.checks.append(Check(name, target, False, "\n".join(shown) + more))
        else:
            self.checks.append(Check(name, target, True, passed))


@dataclass
class _Artifact:
    """Where each manifest entry lives locally."""

    root: Path
    manifest: dict[str, Any]
    local: dict[tuple[str, str], Path]
    extra_local: list[str]
    source: Any  # ArtifactSource
    is_run: bool
    refused: list[str] = field(default_factory=list)  # manifest paths never read (absolute, escaping)


def unsafe_manifest_path(path: str) -> str | None:
    """Why a manifest path must not be read (absolute, escaping the artifact...), or None."""
    if not isinstance(path, str) or not path:
        return "is not a non-empty string"
    if path.startswith(("/", "\\")) or (len(path) > 1 and path[1] == ":"):
        return "is absolute"
    if "\\" in path:
        return "contains a backslash"
    if "\x00" in path:
        return "contains a NUL byte"
    parts = path.split("/")
    if ".." in parts:
        return "leaves the artifact ('..')"
    if any(part in ("", ".") for part in parts):
        return "has an empty or '.' component"
    return None


def _inside(root: Path, path: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
    except (ValueError, OSError):
        return False
    return True


def load_manifest(manifest_path: Path) -> dict[str, Any]:
    """Read a manifest and check the structure verify relies on; VerifyError on anything malformed."""
    if not manifest_path.is_file():
        raise VerifyError(f"{manifest_path}: not found; pass a run directory (runs/<name>) or a published artifact")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise VerifyError(f"{manifest_path}: not valid JSON: {exc}") from None
    if not isinstance(manifest, dict):
        raise VerifyError(f"{manifest_path}: expected a JSON object; re-download the artifact or rerun `invoke manifest`")
    for key in ("files", "unpublished"):
        entries = manifest.get(key, [])
        if not isinstance(entries, list):
            raise VerifyError(f"{manifest_path}: '{key}' must be a list of file entries")
        for index, entry in enumerate(entries):
            if not (isinstance(entry, dict) and entry.get("repo") in ("model", "gguf")
                    and isinstance(entry.get("path"), str)
                    and isinstance(entry.get("size_bytes"), int) and not isinstance(entry.get("size_bytes"), bool)
                    and isinstance(entry.get("sha256"), str)):
                raise VerifyError(
                    f"{manifest_path}: {key}[{index}] is not an entry with repo ('model'/'gguf'), path, "
                    "size_bytes (integer) and sha256; the manifest is malformed: re-download the artifact "
                    "or rerun `invoke manifest`"
                )
    for key in ("recipe", "repo_ids"):
        if manifest.get(key) is not None and not isinstance(manifest.get(key), dict):
            raise VerifyError(f"{manifest_path}: '{key}' must be an object")
    return manifest


def _open_artifact(path: Path, base_dir: Path | None, gguf_dir: Path | None = None) -> _Artifact:
    from moeprune.card.source import ArtifactSource

    manifest = load_manifest(path / MANIFEST_NAME)
    entries = manifest.get("files", []) + manifest.get("unpublished", [])
    refused = [f"{e['repo']}:{e['path']}: manifest path {why}; refused (never read)"
               for e in entries if (why := unsafe_manifest_path(e["path"]))]
    safe = {(e["repo"], e["path"]) for e in entries if not unsafe_manifest_path(e["path"])}
    if (path / "pruned").is_dir():  # a run directory
        layout = RunLayout(path)
        published, unpublished = artifact_files(layout, manifest.get("recipe") or {})
        local = {(f.repo, f.path_in_repo): f.local_path for f in published + unpublished}
        listed = {(e["repo"], e["path"]) for e in entries}
        extra = sorted(f"{repo}:{p}" for repo, p in set(local) - listed)
        local = {key: value for key, value in local.items() if key in safe or key not in listed}
        source = ArtifactSource.from_run(layout, manifest.get("recipe") or {}, base_dir=base_dir)
        return _Artifact(path, manifest, local, extra, source, True, refused)
    local = {}
    for entry in manifest.get("files", []):
        key = (entry["repo"], entry["path"])
        if key not in safe:
            continue
        if entry["repo"] == "model":
            candidate = path / entry["path"]
            if candidate.exists() and not _inside(path, candidate):
                refused.append(f"{entry['path']}: a link that leaves the artifact; refused (never read)")
                continue
            local[key] = candidate
        elif gguf_dir is not None and (gguf_dir / entry["path"]).is_file() and _inside(gguf_dir, gguf_dir / entry["path"]):
            local[key] = gguf_dir / entry["path"]
    present = {
        p.relative_to(path).as_posix()
        for p in path.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
    }
    listed_model = {entry["path"] for entry in manifest.get("files", []) if entry.get("repo") == "model"}
    extra = sorted(f"model:{p}" for p in present - listed_model - _IGNORED_LOCAL)
    source = ArtifactSource.from_artifact(path, base_dir=base_dir, gguf_dir=gguf_dir)
    return _Artifact(path, manifest, local, extra, source, False, refused)


# --- checks -------------------------------------------------------------------------------------
def _check_manifest(report: VerifyReport, art: _Artifact) -> None:
    from moeprune.schemas import SchemaError, validate

    try:
        validate("manifest", art.manifest, source=art.root / MANIFEST_NAME)
        report.add("schema", MANIFEST_NAME, [], "valid")
    except SchemaError as exc:
        report.add("schema", MANIFEST_NAME, [str(exc)])


def _check_hashes(report: VerifyReport, art: _Artifact, remote_gguf: dict[str, Any] | None) -> None:
    problems = []
    checked = skipped = 0
    deleted: list[str] = []
    entries = [(e, "published") for e in art.manifest.get("files", [])] + [
        (e, "unpublished") for e in art.manifest.get("unpublished", [])
    ]
    for entry, kind in entries:
        if unsafe_manifest_path(entry["path"]):
            continue  # reported below (art.refused), never read
        key = (entry["repo"], entry["path"])
        shown = f"{entry['repo']}:{entry['path']}" if entry["repo"] != "model" else entry["path"]
        path = art.local.get(key)
        if (path is None or not path.is_file()) and kind == "unpublished" and entry.get("deleted"):
            deleted.append(shown)  # an intermediate deleted on purpose (moeprune.deleted): its record is the entry
            continue
        if path is None or not path.is_file():
            if entry["repo"] == "gguf" and remote_gguf is not None and kind == "published":
                remote = remote_gguf.get(entry["path"])
                if remote is None:
                    problems.append(f"{shown}: missing from the GGUF repository")
                elif remote.get("sha256") not in (None, entry["sha256"]) or remote["size"] != entry["size_bytes"]:
                    problems.append(f"{shown}: the Hub has sha256 {remote.get('sha256')} ({remote['size']} bytes), "
                                    f"manifest says {entry['sha256']} ({entry['size_bytes']} bytes)")
                else:
                    checked += 1
                continue
            if entry["repo"] == "gguf" and not art.is_run:
                skipped += 1  # the GGUF repo or the unpublished base GGUF is not part of this download
                continue
            problems.append(f"{shown}: listed in the manifest but missing"
                            + ("; restore it or rerun the stage that makes it" if art.is_run else ""))
            continue
        size = path.stat().st_size
        if size != entry["size_bytes"]:
            problems.append(f"{shown}: size {size} bytes, manifest says {entry['size_bytes']}")
            continue
        digest = sha256_file(path)
        if digest != entry["sha256"]:
            problems.append(f"{shown}: sha256 {digest} does not match the manifest's {entry['sha256']}")
            continue
        checked += 1
    problems += art.refused
    problems += [f"{name}: present but not listed in the manifest" for name in art.extra_local]
    note = (f"{checked} files match" + (f"; {skipped} GGUF files not downloaded (not checked)" if skipped else "")
            + (f"; {', '.join(deleted)}: deleted, record kept" if deleted else ""))
    report.add("sha256 + size", "manifest.json files", problems, note)


def _check_schemas(report: VerifyReport, art: _Artifact) -> None:
    from moeprune.schemas import SCHEMA_DIR, SchemaError, validate_file

    for path_in_repo, schema in sorted(SCHEMA_OF.items()):
        if path_in_repo == MANIFEST_NAME:
            continue
        path = art.local.get(("model", path_in_repo))
        if path is None:
            continue
        if not (SCHEMA_DIR / f"{schema}.schema.json").is_file():
            report.add("schema", path_in_repo, [], skipped=f"schemas/{schema}.schema.json not available")
            continue
        try:
            validate_file(schema, path)
            report.add("schema", path_in_repo, [], f"valid ({schema})")
        except SchemaError as exc:
            report.add("schema", path_in_repo, [str(exc)])


def _diff(stored: Any, recomputed: Any, where: str = "") -> list[str]:
    if isinstance(stored, dict) and isinstance(recomputed, dict):
        out = []
        for key in sorted(set(stored) | set(recomputed), key=str):
            sub = f"{where}/{key}"
            if key not in stored or key not in recomputed:
                out.append(f"{sub}: {'missing in file' if key not in stored else 'not recomputed'}")
            else:
                out += _diff(stored[key], recomputed[key], sub)
        return out
    if isinstance(stored, list) and isinstance(recomputed, list) and len(stored) == len(recomputed):
        return [line for i, (a, b) in enumerate(zip(stored, recomputed)) for line in _diff(a, b, f"{where}/{i}")]
    if isinstance(stored, float) and isinstance(recomputed, (int, float)) and not isinstance(recomputed, bool):
        if math.isclose(stored, recomputed, rel_tol=1e-12, abs_tol=1e-15):
            return []
    return [] if stored == recomputed else [f"{where or '/'}: file says {stored!r}, recomputed {recomputed!r}"]


def _check_results(report: VerifyReport, art: _Artifact) -> dict[str, Any] | None:
    from moeprune.eval.results import RESULTS_NAME, recompute_results

    results_path = art.source.eval_dir / RESULTS_NAME
    target = "eval/results.json"
    if not results_path.is_file():
        report.add("recompute", target, [f"{target}: missing"])
        return None
    try:
        recomputed = json.loads(json.dumps(recompute_results(art.source.eval_dir)))
    except MoepruneError as exc:
        report.add("recompute from sample logs", target, [str(exc)])
        return None
    stored = json.loads(results_path.read_text(encoding="utf-8"))
    problems = [f"{target}{line}" for line in _diff(stored, recomputed)]
    report.add("recompute from sample logs", target, problems, "every metric matches the sample logs")
    return recomputed


def _check_rescore(report: VerifyReport, art: _Artifact) -> None:
    """Every sample re-scored with its task's own filters and metric (see moeprune.eval.rescore)."""
    from moeprune.eval.rescore import rescore_eval_dir

    target = "eval/*/samples_*.jsonl"
    try:
        outcome = rescore_eval_dir(art.source.eval_dir)
    except MoepruneError as exc:
        report.add("re-score samples", target, [str(exc)])
        return
    passed = f"{outcome.samples_checked} samples re-scored with the task's filters: every score agrees"
    if outcome.notes:
        passed += "; " + "; ".join(outcome.notes)
    report.add("re-score samples", target, outcome.problems, passed)


CODE_SUFFIXES = (".py", ".pyc", ".so", ".dll", ".dylib", ".sh", ".ipynb")
PICKLE_SUFFIXES = (".pkl", ".pickle", ".bin", ".pt", ".pth", ".ckpt", ".joblib", ".npy", ".npz", ".dill")


def risky_files(art: _Artifact) -> list[str]:
    """Code and pickle files in the artifact, and code a config names through ``auto_map``."""
    findings = []
    names = sorted({f"{repo}:{p}" if repo != "model" else p for repo, p in art.local}
                   | {name.removeprefix("model:") for name in art.extra_local})
    for name in names:
        lower = name.lower()
        if lower.endswith(CODE_SUFFIXES):
            findings.append(f"{name}: code file (not run by verify; read it before loading with trust_remote_code)")
        elif lower.endswith(PICKLE_SUFFIXES):
            findings.append(f"{name}: pickle-capable format (not loaded by verify; unpickling can run code)")
    from moeprune.arch.spec import auto_map_refs

    for (repo, rel), path in sorted(art.local.items()):
        if repo != "model" or not rel.endswith("config.json") or not path.is_file():
            continue
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            continue
        for refs in auto_map_refs(config):
            findings.append(f"{rel}: auto_map names custom code ({', '.join(refs)}); transformers runs it "
                            "only with trust_remote_code=True")
    return findings


def _check_risky_files(report: VerifyReport, art: _Artifact) -> None:
    findings = risky_files(art)
    if findings:
        report.warn("code / pickle files", "artifact", findings)
    else:
        report.add("code / pickle files", "artifact", [], "none: safetensors and JSON only")


def _check_kld(report: VerifyReport, art: _Artifact, results: dict[str, Any] | None) -> None:
    """eval/kld.json: every number re-parsed from its llama-perplexity evidence, the rival re-chosen,
    the self-check redone, and the pruned row measured the GGUF that was evaluated and published."""
    from moeprune.kld.report import recompute_kld

    target = "eval/kld.json"
    path = art.local.get(("model", target))
    if path is None or not path.is_file():
        enabled = ((art.manifest.get("recipe") or {}).get("kld") or {}).get("enabled", False)
        if enabled:
            report.add("KLD recompute", target, [f"{target}: missing, but the recipe has kld.enabled = true"])
        else:
            report.add("KLD recompute", target, [], skipped="the recipe did not measure KL divergence")
        return
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
        recomputed = recompute_kld(art.source.eval_dir, stored)
    except (ValueError, KeyError, StopIteration, MoepruneError) as exc:
        report.add("KLD recompute", target, [f"{target}: {exc}"])
        return
    problems = [f"{target}{line}" for line in _diff(stored, recomputed)]
    if stored.get("enabled"):
        rows = {row["role"]: row for row in stored.get("rows", [])}
        pruned = rows.get("pruned-eval")
        for role, model in (("pruned-eval", "pruned"), ("plain-eval", "plain")):  # measured = evaluated
            row = rows.get(role)
            evaluated = ((results or {}).get("models", {}).get(model) or {}).get("gguf")
            if row is not None and evaluated is not None and row["gguf"]["sha256"] != evaluated["sha256"]:
                problems.append(f"{target}: the {role} row measured sha256 {row['gguf']['sha256']}, but "
                                f"eval/results.json evaluated {evaluated['sha256']} for {model}")
        published = {e["sha256"] for e in art.manifest.get("files", []) if e.get("repo") == "gguf"}
        if pruned is not None and published and pruned["gguf"]["sha256"] not in published:
            problems.append(f"{target}: the pruned-eval row's GGUF ({pruned['gguf']['file']}) is no published GGUF")
    passed = (f"{len(stored.get('rows', []))} rows re-parsed from eval/kld/; rival {stored['rival']['quant_type']}"
              if stored.get("enabled") else "the recipe turned the kld stage off")
    report.add("KLD recompute", target, problems, passed)


def _check_drop_map(report: VerifyReport, art: _Artifact) -> None:
    from moeprune.arch import inspect
    from moeprune.dropmap.io import load_drop_map

    target = "expert_drop_metadata.json"
    problems: list[str] = []
    try:
        drop_map = load_drop_map(art.source.drop_map_path)
        spec = inspect(art.source.model_dir)
        facts = spec.checkpoint  # the headers, read once for every check below
    except MoepruneError as exc:
        report.add("drop map vs weights", target, [str(exc)])
        return
    copy = art.source.model_dir / target
    if art.is_run and copy.is_file() and sha256_file(copy) != sha256_file(art.source.drop_map_path):
        problems.append(f"pruned/{target} differs from the run's {target}: the checkpoint was pruned with "
                        "another drop map; rerun `invoke prune`")
    kept = drop_map.num_experts_kept
    if kept is not None and spec.num_experts_stated != kept:
        problems.append(f"config.json: {spec.adapter.num_experts_key} = {spec.num_experts_stated}, drop map keeps {kept}")
    if drop_map.top_k != spec.top_k:
        problems.append(f"config.json: top-k {spec.top_k} differs from the drop map's {drop_map.top_k}")
    layers = {entry["layer"]: entry for entry in drop_map["layers"]}
    if sorted(layers) != sorted(facts.experts_per_layer):
        problems.append(f"drop map covers layers {sorted(layers)}, the weights have expert tensors in "
                        f"{sorted(facts.experts_per_layer)}")
    for layer, entry in sorted(layers.items()):
        got = facts.experts_per_layer.get(layer)
        if got is not None and got != len(entry["keep"]):
            problems.append(f"layer {layer}: weights hold {got} experts, drop map keeps {len(entry['keep'])}")
    report.add("drop map vs weights", target, problems,
               f"{len(layers)} layers, {kept if kept is not None else 'varying'} of {drop_map['num_experts']} experts kept")


def _number_matches(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def _check_card(report: VerifyReport, art: _Artifact, results: dict[str, Any] | None) -> None:
    from moeprune.card.numbers import compute_card_numbers
    from moeprune.card.render import (
        CARD_NUMBERS_NAME,
        GGUF_TEMPLATE_PATH,
        TEMPLATE_PATH,
        made_by_these_templates,
        render_gguf_text,
        render_text,
    )

    numbers_path = art.local.get(("model", CARD_NUMBERS_NAME))
    readme_path = art.local.get(("model", "README.md"))
    if numbers_path is None or readme_path is None or not numbers_path.is_file() or not readme_path.is_file():
        report.add("card numbers", "README.md", ["README.md or card_numbers.json is missing"])
        return
    if results is None:
        report.add("card numbers", CARD_NUMBERS_NAME, [], skipped="eval results could not be recomputed")
        return
    stored = json.loads(numbers_path.read_text(encoding="utf-8"))
    try:
        recomputed = compute_card_numbers(art.source, results, stored)
    except MoepruneError as exc:
        report.add("card numbers", CARD_NUMBERS_NAME, [str(exc)])
        return
    problems = []
    stored_numbers = stored.get("numbers", {})
    for key in sorted(set(stored_numbers) | set(recomputed.numbers)):
        if key not in recomputed.numbers:
            problems.append(f"{CARD_NUMBERS_NAME}: '{key}' cannot be recomputed from the artifacts")
            continue
        if key not in stored_numbers:
            problems.append(f"{CARD_NUMBERS_NAME}: '{key}' is missing")
            continue
        ours, theirs = recomputed.numbers[key], stored_numbers[key]
        if not _number_matches(theirs.get("value"), ours.value) or theirs.get("display") != ours.display:
            problems.append(f"{CARD_NUMBERS_NAME}: '{key}' = {theirs.get('display')!r} ({theirs.get('value')!r}), "
                            f"recomputed {ours.display!r} ({ours.value!r}) from {ours.source}")
    facts = json.loads(json.dumps(recomputed.facts))
    for key in sorted(set(stored.get("facts", {})) | set(facts)):
        if stored.get("facts", {}).get(key) != facts.get(key):
            problems.append(f"{CARD_NUMBERS_NAME}: fact '{key}' = {stored.get('facts', {}).get(key)!r}, "
                            f"recomputed {facts.get(key)!r}")
    passed = f"{len(recomputed.numbers)} numbers recomputed"
    if recomputed.not_rederived:  # a Hub artifact's GGUF files are not downloaded
        passed += "; bits per weight as stated (GGUF not downloaded): " + ", ".join(recomputed.not_rederived)
    report.add("card numbers", CARD_NUMBERS_NAME, problems, passed)

    # The card text: re-render from the recomputed numbers and compare line by line.
    text = readme_path.read_text(encoding="utf-8")
    card_problems = _check_card_metadata(text)
    if not made_by_these_templates(stored, recomputed):
        # A card made by another template version: check each number appears where it can.
        missing = [f"README.md: '{key}' = {n.display!r} does not appear on the card"
                   for key, n in recomputed.numbers.items() if n.display not in text]
        report.add("card text", "README.md", card_problems + missing,
                   "made by another template version: every number appears on the card")
        return
    expected = render_text(recomputed, stored.get("context", {}), TEMPLATE_PATH)
    if expected != text:
        card_problems += _describe_card_diff(expected, text, recomputed)
    report.add("card text", "README.md", card_problems, "re-rendered from recomputed numbers: identical")

    gguf_readme = art.local.get(("gguf", "README.md"))
    if gguf_readme is not None and gguf_readme.is_file():
        if stored.get("gguf_template_sha256") != sha256_file(GGUF_TEMPLATE_PATH):
            report.add("card text", "gguf:README.md", [], skipped="made by another template version")
            return
        want = render_gguf_text(recomputed, stored.get("context", {}))
        got = gguf_readme.read_text(encoding="utf-8")
        problems = [] if want == got else [p.replace("README.md", "gguf:README.md", 1)
                                           for p in _describe_card_diff(want, got, recomputed)]
        report.add("card text", "gguf:README.md", problems, "re-rendered from recomputed numbers: identical")


def _check_card_metadata(text: str) -> list[str]:
    """The card must load with huggingface_hub and carry its metadata."""
    from huggingface_hub import ModelCard

    try:
        card = ModelCard(text, ignore_metadata_errors=False)
    except Exception as exc:  # noqa: BLE001 - any parse failure is reported as such
        return [f"README.md: metadata does not load with ModelCard: {exc}"]
    if not card.data.to_dict().get("license"):
        return ["README.md: metadata has no license"]
    return []


def _describe_card_diff(expected: str, actual: str, numbers: Any) -> list[str]:
    exp_lines, act_lines = expected.splitlines(), actual.splitlines()
    problems = []
    for index in range(max(len(exp_lines), len(act_lines))):
        want = exp_lines[index] if index < len(exp_lines) else ""
        got = act_lines[index] if index < len(act_lines) else ""
        if want == got:
            continue
        missing = [(key, n.display) for key, n in numbers.numbers.items()
                   if n.display in want and want.count(n.display) > got.count(n.display)]
        # Longest first, and no display that is part of a longer one ('3' inside '95.43%').
        missing.sort(key=lambda item: -len(item[1]))
        named: list[tuple[str, str]] = []
        for key, display in missing:
            if not any(display in longer and display != longer for _, longer in named):
                named.append((key, display))
        culprits = [f"'{key}' should read {display!r}" for key, display in named]
        detail = "; ".join(culprits[:4]) or f"expected {want.strip()!r}"
        problems.append(f"README.md line {index + 1}: {got.strip()!r} disagrees with the artifacts ({detail})")
        if len(problems) >= _MAX_DETAILS:
            break
    return problems


def _check_base(report: VerifyReport, art: _Artifact, base_dir: Path | None) -> None:
    if base_dir is None:
        report.add("kept experts bit-exact", "--base", [], skipped="no --base given")
        return
    from moeprune.card.numbers import checkpoint_facts
    from moeprune.prune.verify import verify_prune

    # The profile's sequences are published: a recalibrated checkpoint's fit is rerun from them.
    sequences = art.source.stats_path.with_name(SEQUENCES_NAME)
    prune_report = verify_prune(base_dir, art.source.model_dir, sequences_path=sequences if sequences.is_file() else None)
    passed = f"{prune_report.expert_slices_checked} expert slices, {prune_report.identical_tensors} tensors identical"
    if prune_report.recalibration_rerun:
        passed += (f"; {prune_report.recalibrated_tensors_checked} recalibrated router tensors as recorded, "
                   f"{prune_report.recalibration_rerun}")
    report.add("kept experts bit-exact", str(base_dir), [f"model weights: {p}" for p in prune_report.problems], passed)
    numbers_path = art.local.get(("model", "card_numbers.json"))
    if numbers_path is None or not numbers_path.is_file():
        return
    stored = json.loads(numbers_path.read_text(encoding="utf-8")).get("numbers", {})
    facts = checkpoint_facts(base_dir)
    problems = []
    for key, actual in (("params.base", facts.params), ("weights.base_bytes", facts.tensor_bytes)):
        if key in stored and stored[key]["value"] != actual:
            problems.append(f"card_numbers.json: '{key}' = {stored[key]['value']}, the base checkpoint has {actual}")
    report.add("base size on the card", str(base_dir), problems, f"{facts.params} parameters, {facts.tensor_bytes} bytes")


def _check_recalibration_record(report: VerifyReport, art: _Artifact) -> None:
    """A recalibrated checkpoint's router tensors are the ones its ``recalibrate.json`` records
    (sha256); with ``--base``, :func:`_check_base` also reruns the fit. Nothing for a checkpoint
    that was not recalibrated."""
    from moeprune.prune.verify import recorded_router_problems

    if not (art.source.model_dir / RECORD_NAME).is_file():
        return
    matched, problems = recorded_router_problems(art.source.model_dir)
    report.add("recalibrated router as recorded", RECORD_NAME, problems, f"{matched} router tensors match their sha256")


def _check_gguf_records(report: VerifyReport, art: _Artifact, results: dict[str, Any] | None) -> None:
    if results is None:
        return
    published = {e["sha256"]: e for e in art.manifest.get("files", []) if e["repo"] == "gguf"}
    unpublished = {e["sha256"]: e for e in art.manifest.get("unpublished", []) if e["repo"] == "gguf"}
    problems = []
    for model, entry in sorted(results["models"].items()):
        gguf = entry["gguf"]
        pool = published if model == "pruned" else {**published, **unpublished}
        found = pool.get(gguf["sha256"])
        if found is None:
            problems.append(f"eval/results.json: models.{model}.gguf.sha256 {gguf['sha256']} is no GGUF file of the manifest")
        elif found["size_bytes"] != gguf["size_bytes"]:
            problems.append(f"eval/results.json: models.{model}.gguf.size_bytes {gguf['size_bytes']} "
                            f"!= manifest {found['size_bytes']} ({found['path']})")
    report.add("evaluated GGUF = published GGUF", "eval/results.json", problems, "sha256 and size match the manifest")


def _check_profile(report: VerifyReport, art: _Artifact) -> None:
    """The drop map was made from these statistics, and profile.json's findings follow from them."""
    from moeprune.profile.findings import compute_findings
    from moeprune.profile.stats import load_stats

    stats_path = art.source.stats_path
    problems = []
    if not stats_path.is_file():
        report.add("profile findings", "profile/stats.safetensors", ["profile/stats.safetensors: missing"])
        return
    try:
        drop_map = json.loads(art.source.drop_map_path.read_text(encoding="utf-8"))
        stats = load_stats(stats_path)
    except (OSError, ValueError, MoepruneError) as exc:
        report.add("profile findings", "profile/stats.safetensors", [str(exc)])
        return
    expected = (drop_map.get("hashes") or {}).get("profile_stats_sha256")
    actual = sha256_file(stats_path)
    if expected and expected != actual:
        problems.append(f"expert_drop_metadata.json: hashes.profile_stats_sha256 = {expected}, "
                        f"but profile/stats.safetensors has sha256 {actual}")
    summary_path = art.local.get(("model", "profile/profile.json"))
    checked = "drop map made from these statistics"
    if summary_path is not None and summary_path.is_file():
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
        settings = (summary.get("settings") or {}).get("profile") or {}
        if "findings" in summary and settings:
            per_domain = {d: stats.per_domain[d]["contribution_sum"] for d in stats.domains}
            found = compute_findings(stats.totals["contribution_sum"], stats.layers, per_domain,
                                     overlap_k=settings["top_overlap_k"], share_k=settings["top_share_k"],
                                     coverage_fraction=settings["coverage_fraction"])
            problems += [f"profile/profile.json: findings{line}"
                         for line in _diff(summary["findings"], json.loads(json.dumps(found)))]
            checked += "; profile.json findings recomputed"
    report.add("profile findings", "profile/stats.safetensors", problems, checked)


def _check_drop_map_rederived(report: VerifyReport, art: _Artifact) -> None:
    """Every layer's keep set and retained fraction re-derived from profile/stats.safetensors with the
    drop-map stage's own selection (moeprune.dropmap.rederive), and the card's retention numbers
    compared with them."""
    from moeprune.card.render import CARD_NUMBERS_NAME
    import numpy as np

    from moeprune.dropmap.rederive import FRACTION_TOLERANCE, rederive_drop_map, show_fraction
    from moeprune.profile.stats import load_stats

    name, target = "drop map re-derived", "expert_drop_metadata.json"
    if not art.source.stats_path.is_file():
        report.add(name, target, ["profile/stats.safetensors: missing; the drop map cannot be re-derived"])
        return
    drop_map = json.loads(art.source.drop_map_path.read_text(encoding="utf-8"))
    stats = load_stats(art.source.stats_path)
    summary_path = art.local.get(("model", "profile/profile.json"))
    max_norm = None
    if summary_path is not None and summary_path.is_file():  # the super-experts statistic (dropmap.protect)
        max_norm = json.loads(summary_path.read_text(encoding="utf-8")).get("max_activation_norm")
    found = rederive_drop_map(drop_map, list(stats.layers), stats.totals, stats.per_domain, target,
                              max_activation_norm=None if max_norm is None else np.asarray(max_norm, dtype=np.float64))
    problems = list(found.problems)
    numbers_path = art.local.get(("model", CARD_NUMBERS_NAME))
    if found.fractions and numbers_path is not None and numbers_path.is_file():
        numbers = json.loads(numbers_path.read_text(encoding="utf-8")).get("numbers") or {}
        for layer, fraction in sorted(found.fractions.items()):
            shown = numbers.get(f"retention.L{layer}")
            value = shown.get("value") if isinstance(shown, dict) else None
            if shown is None or not isinstance(value, (int, float)) or abs(float(value) - fraction) > FRACTION_TOLERANCE:
                problems.append(f"{CARD_NUMBERS_NAME}: 'retention.L{layer}' = "
                                f"{shown.get('display') if isinstance(shown, dict) else None!r} ({value!r}), the "
                                f"profile statistics give {show_fraction(fraction)} for layer {layer}")
    report.add(name, target, problems, found.how + (f"; {len(found.fractions)} card retention numbers match"
                                                     if numbers_path is not None else ""))


def checkpoint_file_hashes(model_dir: Path) -> dict[str, str]:
    """{file name: sha256} of what a converter reads from a checkpoint directory (config, index, shards)."""
    names = ["config.json", "model.safetensors.index.json", *(p.name for p in sorted(model_dir.glob("*.safetensors")))]
    return {name: sha256_file(model_dir / name) for name in names if (model_dir / name).is_file()}


def _published_tower(art: _Artifact, records: dict[str, dict[str, Any] | None]) -> str | None:
    """The published checkpoint's tower digest, read only when a projector record asks for it."""
    from moeprune.llamacpp.mmproj import STAGE, tower_digest

    wanted = any(isinstance(r, dict) and r.get("stage") == STAGE for r in records.values())
    if not wanted or not (art.source.model_dir / "config.json").is_file():
        return None
    return tower_digest(art.source.model_dir)[0]


def _check_custody(report: VerifyReport, art: _Artifact, base_dir: Path | None) -> None:
    """safetensors -> converted GGUF -> quantized GGUF -> eval run.json, by record (moeprune.custody), and
    each unquantized GGUF at hand compared with its safetensors (moeprune.gguf_match)."""
    from moeprune.custody import chain_problems, gguf_entries
    from moeprune.eval.results import RUN_RECORD_NAME
    from moeprune.gguf_match import UNQUANTIZED, compare_gguf_experts, describe

    name, target = "chain of custody", "safetensors -> GGUF -> eval"
    listed = {e["path"] for key in ("files", "unpublished") for e in art.manifest.get(key) or [] if e["repo"] == "gguf"}
    ggufs = gguf_entries(art.manifest)
    records: dict[str, dict[str, Any] | None] = {}
    for file in ggufs:
        if f"{file}.json" not in listed:
            continue
        path = art.local.get(("gguf", f"{file}.json"))
        records[file] = json.loads(path.read_text(encoding="utf-8")) if path is not None and path.is_file() else None
    served = {}
    if art.source.eval_dir.is_dir():
        for run_json in sorted(art.source.eval_dir.glob(f"*/{RUN_RECORD_NAME}")):
            served[run_json.parent.name] = json.loads(run_json.read_text(encoding="utf-8"))
    base_files = checkpoint_file_hashes(base_dir) if base_dir is not None else None
    chain = chain_problems(art.manifest, records, served, base_files, _published_tower(art, records))
    passed = f"{chain.links} links followed from the safetensors to the scored samples"
    if chain.notes:
        passed += "; not followed: " + "; ".join(chain.notes)
    report.add(name, target, chain.problems, passed)

    for file, (role, _) in sorted(ggufs.items()):
        record, path = records.get(file), art.local.get(("gguf", file))
        if record is None or record.get("stage") != "convert" or path is None or not path.is_file():
            continue
        if str(record.get("outtype")).upper() not in UNQUANTIZED:
            continue  # a quantized conversion (q8_0): followed by record only
        # The plain pruned checkpoint differs from the published one in its router only: the same experts.
        source = base_dir if role == "base" else art.source.model_dir
        if source is None:
            report.add("GGUF experts = safetensors", f"gguf:{file}", [], skipped="base GGUF: pass --base to compare")
            continue
        match = compare_gguf_experts(path, source, f"gguf:{file}")
        report.add("GGUF experts = safetensors", f"gguf:{file}", match.problems, describe(match))


def verify_artifact(
    path: Path,
    base_dir: Path | None = None,
    remote_gguf: dict[str, Any] | None = None,
    gguf_dir: Path | None = None,
    rehash: bool = True,
) -> VerifyReport:
    """Run every check on a local run directory or downloaded artifact; return the report.

    For a downloaded artifact, ``gguf_dir`` holds files downloaded from its GGUF repository (they
    are re-hashed), and ``remote_gguf`` the Hub's listing of that repository (sha256 and size of
    the files not downloaded). ``rehash=False`` skips re-hashing (for a manifest just written
    from these very files, as ``publish`` does before uploading).
    """
    path = Path(path)
    try:
        art = _open_artifact(path, base_dir, gguf_dir)
    except MoepruneError:
        raise
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise VerifyError(f"{path}: cannot be read as an artifact ({type(exc).__name__}: {exc})") from None
    report = VerifyReport(str(path))
    _guarded(report, "schema", MANIFEST_NAME, _check_manifest, report, art)
    if rehash:
        _guarded(report, "sha256 + size", "manifest.json files", _check_hashes, report, art, remote_gguf)
    else:
        report.add("sha256 + size", "manifest.json files", [], skipped="manifest written from these files just now")
    _guarded(report, "code / pickle files", "artifact", _check_risky_files, report, art)
    _guarded(report, "schema", "JSON artifacts", _check_schemas, report, art)
    results = _guarded(report, "recompute from sample logs", "eval/results.json", _check_results, report, art)
    _guarded(report, "re-score samples", "eval/*/samples_*.jsonl", _check_rescore, report, art)
    _guarded(report, "evaluated GGUF = published GGUF", "eval/results.json", _check_gguf_records, report, art,
             results)
    _guarded(report, "KLD recompute", "eval/kld.json", _check_kld, report, art, results)
    _guarded(report, "drop map vs weights", "expert_drop_metadata.json", _check_drop_map, report, art)
    _guarded(report, "profile findings", "profile/stats.safetensors", _check_profile, report, art)
    _guarded(report, "drop map re-derived", "expert_drop_metadata.json", _check_drop_map_rederived, report, art)
    _guarded(report, "card numbers", "card_numbers.json", _check_card, report, art, results)
    _guarded(report, "recalibrated router as recorded", RECORD_NAME, _check_recalibration_record, report, art)
    _guarded(report, "kept experts bit-exact", str(base_dir), _check_base, report, art, base_dir)
    _guarded(report, "chain of custody", "safetensors -> GGUF -> eval", _check_custody, report, art, base_dir)
    return report


def _guarded(report: VerifyReport, name: str, target: str, check: Any, *args: Any) -> Any:
    """Run one check; malformed input it cannot digest is a failed row naming the target, never a traceback."""
    try:
        return check(*args)
    except MoepruneError as exc:
        report.add(name, target, [str(exc)])
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError, LookupError,
            ArithmeticError, RecursionError) as exc:
        report.add(name, target, [f"{target}: malformed or unreadable input ({type(exc).__name__}: {exc}); "
                                  "this artifact cannot be checked here"])
    except Exception as exc:  # noqa: BLE001 - e.g. jinja2/safetensors errors on crafted files
        report.add(name, target, [f"{target}: cannot be checked ({type(exc).__name__}: {exc})"])
    return None


def _remote_gguf_listing(api: Any, repo_id: str) -> dict[str, Any]:
    from huggingface_hub.hf_api import RepoFile

    listing = {}
    for entry in api.list_repo_tree(repo_id, recursive=True, expand=True):
        if isinstance(entry, RepoFile):
            listing[entry.path] = {"size": entry.size, "sha256": entry.lfs.sha256 if entry.lfs else None,
                                   "blob_id": entry.blob_id}
    return listing


def verify(target: str, base_dir: Path | None = None, *, endpoint: str | None = None, token: str | None = None,
           revision: str | None = None) -> VerifyReport:
    """Verify a local path, or download a Hub repo id (``endpoint`` configurable) and verify it.

    ``target`` is taken for a Hub id only when it is not an existing or path-like local name
    (absolute, ``./``, ``~``, more than one ``/``, or a first component that exists here), so a
    mistyped local path is reported as not found instead of being looked up on the Hub.
    """
    from moeprune.hub import is_hub_repo_id, looks_like_local_path, redact, resolve_endpoint, resolve_token

    local = Path(target).expanduser()
    if local.exists():
        if not local.is_dir():
            raise VerifyError(f"{target}: not a directory; pass a run directory (runs/<name>) or a downloaded artifact")
        return verify_artifact(local, base_dir)
    if looks_like_local_path(target) or not is_hub_repo_id(target):
        raise VerifyError(
            f"{target}: no such local directory (and not a Hub repo id of the form owner/name); check the "
            "path, or pass the Hub id as owner/name"
        )
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download

    endpoint = resolve_endpoint(endpoint)
    token = resolve_token(token)
    try:
        with tempfile.TemporaryDirectory(prefix="moeprune-verify-") as tmp:
            snapshot = Path(snapshot_download(target, revision=revision, local_dir=Path(tmp) / "artifact",
                                              endpoint=endpoint, token=token or False))
            manifest = json.loads((snapshot / MANIFEST_NAME).read_text(encoding="utf-8")) \
                if (snapshot / MANIFEST_NAME).is_file() else {}
            gguf_repo = (manifest.get("repo_ids") or {}).get("gguf")
            remote = gguf_dir = None
            if gguf_repo:
                remote = _remote_gguf_listing(HfApi(endpoint=endpoint, token=token or False), gguf_repo)
                # Small files, fetched so they are checked too: the card's numbers, and the GGUF
                # records the chain of custody follows (the GGUFs themselves by the Hub's sha256).
                small = sorted(p for p in remote if p == "README.md" or p.endswith(".gguf.json"))
                if small:
                    gguf_dir = Path(tmp) / "gguf"
                for name in small:
                    hf_hub_download(gguf_repo, name, local_dir=gguf_dir, endpoint=endpoint, token=token or False)
            report = verify_artifact(snapshot, base_dir, remote_gguf=remote, gguf_dir=gguf_dir)
            report.subject = target
            return report
    except MoepruneError:
        raise
    except Exception as exc:  # noqa: BLE001 - network/Hub failures become one clear message
        raise VerifyError(f"could not download {target} from {endpoint}: {redact(f'{type(exc).__name__}: {exc}', token)}") from None


def print_report(report: VerifyReport) -> None:
    """The checks as a rich table, then a one-line verdict."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"verify {report.subject}", show_lines=True)
    table.add_column("check")
    table.add_column("target")
    table.add_column("result")
    table.add_column("detail", overflow="fold")
    for check in report.checks:
        status = ("[green]ok[/green]" if check.ok else "[yellow]warning[/yellow]" if check.warning
                  else "[yellow]skipped[/yellow]" if check.ok is None else "[red]FAILED[/red]")
        table.add_row(check.name, check.target, status, check.detail)
    console.print(table)
    if report.ok:
        warned = f", {len(report.warnings)} warning(s)" if report.warnings else ""
        console.print(f"[green]verified[/green]: {sum(1 for c in report.checks if c.ok)} checks passed{warned}")
    else:
        console.print(f"[red]verification failed[/red]: {len(report.failures)} check(s) failed")
