"""The ``kld`` stage: llama-perplexity's KL divergence of each GGUF to the base at converted precision.

1. The base GGUF at ``quantize.convert_outtype`` is the reference: ``--kl-divergence-base`` saves its
   log-probabilities over the recipe's held-out text (``kld.text``) once; the file is kept in
   ``runs/<name>/kld/`` under a key of everything it depends on, so a rerun after a new drop map
   reuses it.
2. The base is quantized to every type of ``kld.rival_types`` (kept in ``kld/`` too); the one whose
   file is closest in size to the pruned eval quant is the equal-size rival.
3. ``--kl-divergence`` runs for the reference itself (the self-check: KLD 0), the base and pruned
   eval quants, the pruned model at converted precision and every rival candidate; with
   ``[recalibrate]`` on, also the plain pruned model's eval quant (the same size, before recalibration).

Writes ``eval/kld.json`` (schemas/kld.schema.json) and ``eval/kld/<label>.txt``, the deterministic
part of each output; full outputs go to ``logs/kld-<label>.log``.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from moeprune.atomic import atomic_file, write_json
from moeprune.hashing import sha256_file, sha256_json
from moeprune.kld.report import (
    KLD_FORMAT_VERSION,
    KldError,
    choose_rival,
    reference_numbers,
    rival_record,
    row_numbers,
    self_check,
)
from moeprune.kld.paths import kld_work_dir
from moeprune.layout import RunLayout
from moeprune.llamacpp.build import LlamaCppBuild
from moeprune.llamacpp.rpc import rpc_flags, topology
from moeprune.llamacpp.perplexity import (
    base_evidence_text,
    evidence_text,
    perplexity_command,
    run_until_complete,
)
from moeprune.progress import track
from moeprune.recalibrate import measured_models
from moeprune.recipe import Recipe


def _gguf_entry(path: Path, layout: RunLayout, work: Path) -> dict[str, Any]:
    return {"file": _shown(path, layout, work), "sha256": sha256_file(path), "size_bytes": path.stat().st_size}


def _shown(path: Path, layout: RunLayout, work: Path) -> str:
    """A file as recorded: relative to the run directory; one in the work directory as ``kld/<file>``
    wherever kld.work_dir put it."""
    resolved = Path(path).resolve()
    for root, prefix in ((work.resolve(), Path(layout.kld_work_dir.name)), (layout.root.resolve(), Path())):
        try:
            return (prefix / resolved.relative_to(root)).as_posix()
        except ValueError:
            continue
    return Path(path).name


def _stable_command(command: list[str], layout: RunLayout, work: Path, text_path: Path) -> list[str]:
    """The command as recorded: the binary by name, run files relative to the run directory."""
    out = [Path(command[0]).name]
    for arg in command[1:]:
        if arg == str(text_path):
            out.append(text_path.name)
        elif "/" in arg and not arg.startswith("-"):
            out.append(_shown(Path(arg), layout, work))
        else:
            out.append(arg)
    return out


def _settings(recipe: Recipe) -> dict[str, Any]:
    section = recipe.kld
    return {
        "ctx_size": section.ctx_size,
        "chunks": section.chunks,
        "threads": recipe.serve.threads,
        "n_gpu_layers": recipe.serve.n_gpu_layers,
        "rival_types": list(section.rival_types),
        "self_kld_tolerance": section.self_kld_tolerance,
        "convert_outtype": recipe.quantize.convert_outtype,
        "eval_type": recipe.quantize.eval_type,
    }


def _candidate_gguf(recipe: Recipe, layout: RunLayout, build: LlamaCppBuild, qtype: str) -> Path:
    """The base quantized to ``qtype``: the run's own file when it has one, else made (once) in kld/."""
    from moeprune.llamacpp.quantize import quantize_gguf
    from moeprune.llamacpp.stages import gguf_path

    if qtype.upper() in (t.upper() for t in recipe.quantize.types):
        return gguf_path(recipe, "base", qtype, layout)
    source = gguf_path(recipe, "base", recipe.quantize.convert_outtype, layout)
    target = kld_work_dir(recipe, layout) / f"base-{qtype.upper()}.gguf"
    record_path = target.with_name(target.name + ".json")
    if target.is_file() and record_path.is_file():
        record = json.loads(record_path.read_text(encoding="utf-8"))
        if (record.get("in_sha256") == sha256_file(source) and record.get("llamacpp_key") == build.key
                and record.get("sha256") == sha256_file(target)):
            return target
    quantize_gguf(build, source, target, qtype, threads=recipe.serve.threads,
                  log_path=layout.logs_dir / f"kld-quantize-{target.stem}.log")
    return target


def _reference_logits(recipe: Recipe, layout: RunLayout, build: LlamaCppBuild, reference: Path,
                      text_path: Path) -> tuple[Path, str, list[str]]:
    """The reference's saved log-probabilities (made once per key) and the output that made them."""
    settings = _settings(recipe)
    key = sha256_json({
        "reference_sha256": sha256_file(reference), "text_sha256": sha256_file(text_path), "build": build.key,
        **{name: settings[name] for name in ("ctx_size", "chunks", "n_gpu_layers")},
    })[:16]
    work = kld_work_dir(recipe, layout)
    logits = work / f"reference-{key}.kld"
    output_path = work / f"reference-{key}.out"
    command = perplexity_command(build, reference, text_path, logits, ctx_size=settings["ctx_size"], compare=False,
                                 chunks=settings["chunks"],
                                 threads=settings["threads"], n_gpu_layers=settings["n_gpu_layers"])
    if logits.is_file() and output_path.is_file():
        return logits, output_path.read_text(encoding="utf-8"), command
    work.mkdir(parents=True, exist_ok=True)
    for stale in work.glob("reference-*"):
        stale.unlink()  # another key: another reference, text or setting
    with tempfile.TemporaryDirectory(prefix=".reference.tmp-", dir=work) as tmp:
        tmp_logits = Path(tmp) / logits.name
        tmp_command = [str(tmp_logits) if arg == str(logits) else arg for arg in command] + rpc_flags(recipe.serve.rpc)
        where = f"llama-perplexity --kl-divergence-base on {reference.name}"
        _, evidence = run_until_complete(tmp_command, layout.logs_dir / "kld-reference.log",
                                         f"saving the reference log-probabilities of {reference.name}",
                                         lambda text: base_evidence_text(text, where))
        if not tmp_logits.is_file() or tmp_logits.stat().st_size == 0:
            raise KldError(f"llama-perplexity exited 0 but wrote no log-probabilities ({tmp_logits.name}); "
                           f"log: {layout.logs_dir / 'kld-reference.log'}")
        os.replace(tmp_logits, logits)
    with atomic_file(output_path) as handle:
        handle.write(evidence)
    return logits, evidence, command


def run_kld(recipe: Recipe, layout: RunLayout, build: LlamaCppBuild) -> dict[str, Any]:
    """Measure every GGUF against the reference; write eval/kld.json and its evidence. Returns kld.json."""
    from moeprune.kld.heldout import heldout_text, source_record
    from moeprune.llamacpp.stages import gguf_path
    from moeprune.schemas import validate

    section = recipe.kld
    if not section.enabled:
        document = {"format_version": KLD_FORMAT_VERSION, "recipe_name": recipe.name, "enabled": False}
        validate("kld", document, source=layout.kld_path)
        write_json(layout.kld_path, document)
        layout.kld_evidence_dir.mkdir(parents=True, exist_ok=True)
        return document
    text_path = heldout_text(recipe, layout)
    outtype = recipe.quantize.convert_outtype
    eval_type = recipe.quantize.eval_type
    reference = gguf_path(recipe, "base", outtype, layout)
    for path in (reference, gguf_path(recipe, "pruned", eval_type, layout)):
        if not path.is_file():
            raise KldError(f"{path}: not found; run the convert and quantize stages first")
    settings = _settings(recipe)
    work = kld_work_dir(recipe, layout)
    served_on = topology(recipe.serve.rpc, build.record)  # asked before llama-perplexity connects (one client)
    logits, reference_output, reference_command = _reference_logits(recipe, layout, build, reference, text_path)

    # (label, model, quant type, role, file; None: a rival, made in its turn)
    plan: list[tuple[str, str, str, str, Path | None]] = [
        (f"base-{outtype.upper()}", "base", outtype.upper(), "reference", reference),
        (f"base-{eval_type}", "base", eval_type, "base-eval", gguf_path(recipe, "base", eval_type, layout)),
        (f"pruned-{eval_type}", "pruned", eval_type, "pruned-eval", gguf_path(recipe, "pruned", eval_type, layout)),
        (f"pruned-{outtype.upper()}", "pruned", outtype.upper(), "pruned-converted",
         gguf_path(recipe, "pruned", outtype, layout)),
    ]
    if "plain" in measured_models(recipe):  # the pruned checkpoint before recalibration, at the same size
        plan.append((f"plain-{eval_type}", "plain", eval_type, "plain-eval", gguf_path(recipe, "plain", eval_type, layout)))
    for qtype in recipe.quantize.types:
        if qtype != eval_type:
            plan.append((f"pruned-{qtype}", "pruned", qtype, "pruned-quant", gguf_path(recipe, "pruned", qtype, layout)))
    rivals: dict[str, str] = {}  # label -> quant type: each is made (or found) when its turn comes
    for qtype in section.rival_types:
        if qtype.upper() == eval_type.upper():
            continue  # already the base-eval row
        rivals[f"base-{qtype.upper()}"] = qtype
        plan.append((f"base-{qtype.upper()}", "base", qtype.upper(), "base-candidate", None))
    if not any(role == "base-candidate" for _, _, _, role, _ in plan):
        raise KldError(f"kld.rival_types = {section.rival_types}: name at least one type other than "
                       f"quantize.eval_type ({eval_type})")

    reference_ppl = reference_numbers(reference_output, "reference")["ppl"]
    rows = []
    evidence: dict[str, str] = {"reference.txt": reference_output}
    for label, model, qtype, role, path in track(plan, description="kld: llama-perplexity --kl-divergence per GGUF"):
        if path is None:
            path = _candidate_gguf(recipe, layout, build, rivals[label])
        if not path.is_file():
            raise KldError(f"{path}: not found; run the quantize stages first")
        command = perplexity_command(build, path, text_path, logits, ctx_size=settings["ctx_size"], compare=True,
                                     chunks=settings["chunks"],
                                     threads=settings["threads"], n_gpu_layers=settings["n_gpu_layers"])
        where = f"llama-perplexity --kl-divergence on {path.name}"
        _, kept = run_until_complete(command + rpc_flags(recipe.serve.rpc), layout.logs_dir / f"kld-{label}.log",
                                     f"KL divergence of {path.name}",
                                     lambda text: evidence_text(text, where))
        evidence[f"{label}.txt"] = kept
        rows.append({
            "label": label, "model": model, "quant_type": qtype, "role": role,
            "gguf": _gguf_entry(path, layout, work),
            "command": _stable_command(command, layout, work, text_path),
            "evidence": f"kld/{label}.txt",
            "evidence_sha256": _sha256_text(kept),
            **row_numbers(kept, reference_ppl, f"{label}.txt"),
        })
        if recipe.disk.delete_intermediates and path.parent == work:
            path.unlink()  # a scored rival: its size and sha256 are in the row; made again if the stage reruns

    candidates = {row["quant_type"]: row["gguf"]["size_bytes"] for row in rows if row["role"] == "base-candidate"}
    pruned_label = f"pruned-{eval_type}"
    pruned_size = next(row["gguf"]["size_bytes"] for row in rows if row["label"] == pruned_label)
    rival_type = choose_rival(pruned_size, candidates)
    rival_label = f"base-{rival_type}"
    check = self_check(next(row for row in rows if row["role"] == "reference"), section.self_kld_tolerance)
    reference_evidence = evidence["reference.txt"]
    document = {
        "format_version": KLD_FORMAT_VERSION,
        "recipe_name": recipe.name,
        "enabled": True,
        "settings": settings,
        "text": {"file": text_path.name, "sha256": sha256_file(text_path), "size_bytes": text_path.stat().st_size,
                 **({"source": record} if (record := source_record(recipe)) else {})},
        "llamacpp_build": build.key,
        "topology": served_on,
        "reference": {
            "label": f"base-{outtype.upper()}",
            "gguf": _gguf_entry(reference, layout, work),
            "command": _stable_command(reference_command, layout, work, text_path),
            "evidence": "kld/reference.txt",
            "evidence_sha256": _sha256_text(reference_evidence),
            **reference_numbers(reference_evidence, "reference.txt"),
        },
        "rows": rows,
        "rival": rival_record(rows, pruned_label, rival_label),
        "self_check": check,
    }
    if not check["passed"]:
        raise KldError(
            f"self-check failed: the reference {check['label']} against its own saved log-probabilities gives "
            f"mean KLD {check['mean_kld']:.3g} (tolerance kld.self_kld_tolerance = {check['tolerance']:g}), top-1 "
            f"agreement {check['top1_agreement']:.5f}, PPL ratio {check['ppl_ratio']:.6f}; llama-perplexity is not "
            f"deterministic here, so no KLD of this run can be trusted (log: {layout.logs_dir / 'kld-reference.log'})"
        )
    validate("kld", document, source=layout.kld_path)
    _write_evidence(layout.kld_evidence_dir, evidence)
    write_json(layout.kld_path, document)
    return document


def _sha256_text(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _write_evidence(directory: Path, files: dict[str, str]) -> None:
    """Replace ``directory`` whole with ``files`` (a crash leaves the old one or the new one)."""
    from moeprune.atomic import atomic_dir

    if directory.exists() and not directory.is_dir():
        raise KldError(f"{directory}: exists and is not a directory")
    with atomic_dir(directory) as tmp:
        for name, text in sorted(files.items()):
            (tmp / name).write_text(text, encoding="utf-8")
