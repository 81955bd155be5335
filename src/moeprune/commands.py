"""One function per task of ``tasks.py``: load the recipe, check it, run the stage, summarise.

``tasks.py`` only parses flags and calls one of these; each returns a :class:`TaskResult`
(the lines the task prints, and a failure message when a check failed). Defaults that several
entry points share (where the base model is, which repo ids a manifest names) live here or in
the stage functions, never in ``tasks.py``.

Tasks reach stages by one route: each stage task calls its package's stage function (``run_profile``,
``run_dropmap``, ..., ``run_card``, ``run_manifest``), the one the pipeline's stage of that name calls
(:mod:`moeprune.pipeline.stages`). Only :func:`stage` runs a pipeline stage by name: it is what
``invoke reproduce --runner docker`` runs in the image.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Literal

from moeprune.cli import TaskResult
from moeprune.errors import MoepruneError
from moeprune.layout import RunLayout
from moeprune.recipe import Recipe, load_recipe

Which = Literal["pruned", "base"]


def _load(recipe_path: Path, stage: str | None = None, check_inputs: bool = True) -> Recipe:
    """The recipe, refused before any work if the preflight checks of ``stage`` fail."""
    recipe = load_recipe(recipe_path, check_inputs=check_inputs)
    if stage is not None:
        from moeprune.preflight import require_preflight

        require_preflight(recipe, stages=[stage], warn=_warn)
    return recipe


def _warn(line: str) -> None:
    print(line, file=sys.stderr)


def _context(recipe: Recipe) -> Any:
    from moeprune.pipeline.graph import Context

    return Context(recipe=recipe, layout=RunLayout.for_recipe(recipe.name))


# --- setup -----------------------------------------------------------------------------------
def write_recipe_schema(target: Path) -> TaskResult:
    from moeprune.atomic import write_json
    from moeprune.recipe import recipe_json_schema

    write_json(target, recipe_json_schema())
    return TaskResult((f"wrote {target}",))


def check(recipe_path: Path) -> TaskResult:
    """Validate a recipe, its inputs and everything a stage would refuse later; run nothing."""
    from moeprune.kld.heldout import describe_source
    from moeprune.preflight import preflight

    recipe = load_recipe(recipe_path)
    report = preflight(recipe)
    lines = [f"warning: {w}" for w in report.warnings]
    if not report.ok:
        return TaskResult(tuple(lines), failure=report.failure(recipe.source_path, "preflight failed"))
    lines.append(f"recipe '{recipe.name}' is valid ({recipe.source_path}); {report.checked} preflight checks passed")
    lines.append(describe_source(recipe))
    from moeprune.profile.memory_plan import check_memory_plan

    lines += check_memory_plan(recipe)
    lines += _run_plan_lines(recipe)
    return TaskResult(tuple(lines), data=report)


def _run_plan_lines(recipe: Recipe) -> list[str]:
    """The whole-run plan of the stages a reproduce would run now (all of them for a fresh run)."""
    from moeprune.pipeline.graph import Context
    from moeprune.pipeline.lock import Lock
    from moeprune.pipeline.reproduce import stages_to_run
    from moeprune.pipeline.stages import build_pipeline
    from moeprune.plan.gather import plan_report

    layout = RunLayout.for_recipe(recipe.name)
    pipeline = build_pipeline()
    will_run = stages_to_run(pipeline, Context(recipe=recipe, layout=layout), pipeline.names)
    report = plan_report(recipe, layout, set(will_run), pipeline.names, Lock.load(layout.lock_path).stages)
    header = f"run plan of `invoke reproduce` ({len(will_run)} of {len(pipeline.names)} stages would run; {layout.root}):"
    return [header, *report.lines]


def llamacpp(recipe_path: Path, jobs: int | None = None) -> TaskResult:
    from moeprune.llamacpp.stages import build_stage

    recipe = load_recipe(recipe_path, check_inputs=False)
    started_unix = int(time.time())
    build, seconds = build_stage(recipe, jobs=jobs)
    source = build.record["source"]
    built_now = int(build.record.get("built_at_unix", 0)) >= started_unix
    return TaskResult((
        f"llama.cpp tools {'built' if built_now else 'found in the cache'}: {build.bin_dir}",
        f"llama.cpp {source.get('kind')} {source.get('version') or source.get('url')} "
        f"(llama.cpp commit {source.get('llama_cpp_commit')}), "
        f"{'CUDA' if build.cuda else 'CPU-only'} build",
        f"key {build.key}: {build.bin_dir}",
        f"ready in {seconds:.2f} s (a fresh build took {build.record['build_seconds']} s)",
    ), data=build)


# --- stages ----------------------------------------------------------------------------------
def profile(recipe_path: Path, progress: bool = True) -> TaskResult:
    from moeprune.profile import run_profile

    recipe = _load(recipe_path, "profile")
    layout = RunLayout.for_recipe(recipe.name)
    summary = run_profile(recipe, layout, progress=progress)
    from moeprune.profile.parallel import current_world

    if not current_world().is_root:
        return TaskResult(())  # rank 0 of a data-parallel profile reports for every rank
    found = summary["findings"]
    return TaskResult((
        f"profiled {summary['num_sequences']} sequences, {summary['num_tokens']} tokens, "
        f"{len(summary['moe']['layers'])} MoE layers -> {layout.profile_dir}",
        f"top-{found['top_share_k']} share {found['top_k_share_pooled']:.1%}, "
        f"experts to {found['coverage_fraction']:.0%}: {found['experts_to_coverage_mean']:.1f} (mean), "
        f"Gini {found['gini_mean']:.2f} (mean over layers)",
    ), data=summary)


def dropmap(recipe_path: Path, **overrides: Any) -> TaskResult:
    from rich.console import Console

    from moeprune.dropmap.stage import run_dropmap, with_dropmap_overrides

    recipe = with_dropmap_overrides(_load(recipe_path, "dropmap", check_inputs=False), **overrides)
    drop_map = run_dropmap(recipe, RunLayout.for_recipe(recipe.name), console=Console())
    return TaskResult(data=drop_map)  # run_dropmap printed the per-layer report


def prune(recipe_path: Path, base: Path | None = None, drop_map: Path | None = None, out: Path | None = None,
          max_shard_bytes: int | None = None) -> TaskResult:
    from moeprune.prune.surgery import run_prune

    recipe = _load(recipe_path, "prune", check_inputs=False)
    # A Hub base is downloaded here when not cached yet (the pipeline's profile stage did that).
    record = run_prune(recipe, RunLayout.for_recipe(recipe.name), base_dir=base or _base_dir(recipe),
                       drop_map_path=drop_map, out_dir=out, max_shard_bytes=max_shard_bytes)
    return TaskResult((
        f"wrote {record['out_dir']}: {record['num_experts']} -> {record['num_experts_kept']} experts in "
        f"{len(record['moe_layers'])} MoE layers, {len(record['shards'])} shard(s), "
        f"{record['total_size']} bytes of tensors, {record['elapsed_s']} s",
    ), data=record)


def verify_prune(recipe_path: Path, base: Path | None = None, pruned: Path | None = None) -> TaskResult:
    from moeprune.prune.verify import verify_prune as verify

    recipe = _load(recipe_path, check_inputs=False)
    layout = RunLayout.for_recipe(recipe.name)
    from moeprune.recalibrate import pruned_side_dir

    default = pruned_side_dir(recipe, layout)
    # A recalibrated checkpoint is also refitted again from the run's calibration sequences.
    sequences = layout.sequences_path if layout.sequences_path.is_file() else None
    report = verify(base or _base_dir(recipe), pruned or default, sequences_path=sequences)
    failure = None if report.ok else "the pruned checkpoint differs from the base beyond the dropped experts"
    return TaskResult((report.render(),), failure=failure, data=report)


def convert(recipe_path: Path, which: Which = "pruned", hf_dir: Path | None = None) -> TaskResult:
    from moeprune.llamacpp.stages import convert_stage

    recipe = _load(recipe_path, f"convert-{which}", check_inputs=False)
    record = convert_stage(recipe, which, hf_dir or (_base_dir(recipe) if which == "base" else None))
    checks = record["checks"]
    return TaskResult((
        f"wrote {record['out_path']} ({record['size_bytes']} bytes, {record['outtype']}); "
        f"{checks['architecture']}.expert_count = {checks['expert_count']}, "
        f"{checks['expert_tensors_checked']} expert tensors checked",
    ), data=record)


def quantize(recipe_path: Path, which: Which = "pruned") -> TaskResult:
    from moeprune.llamacpp.stages import quantize_stage

    records = quantize_stage(_load(recipe_path, f"quantize-{which}", check_inputs=False), which)
    return TaskResult(tuple(
        f"wrote {record['out_path']} ({record['size_bytes']} bytes, {record['qtype']}); "
        f"{record['fallbacks']['count']} tensor(s) fell back to another type"
        for record in records
    ), data=records)


def serve(recipe_path: Path, which: Which = "pruned", gguf_type: str | None = None, port: int | None = None) -> TaskResult:
    from moeprune.llamacpp.stages import serve_stage

    serve_stage(_load(recipe_path, "serve", check_inputs=False), which, gguf_type, port)
    return TaskResult()


def rpc_worker(recipe_path: Path, host: str | None, port: int | None, mem_mb: int | None,
               threads: int | None) -> TaskResult:
    """One llama.cpp RPC worker of the recipe's pinned build, in the foreground until stopped."""
    from moeprune.llamacpp.build import ensure_llamacpp
    from moeprune.llamacpp.rpc import DEFAULT_HOST, DEFAULT_PORT, WORKER_BINARY, run_worker, worker_log_path
    from moeprune.llamacpp.source import cache_root

    host, port = host or DEFAULT_HOST, port or DEFAULT_PORT
    build = ensure_llamacpp(load_recipe(recipe_path, check_inputs=False).llamacpp)
    code = run_worker(build.binary(WORKER_BINARY), build.record, host, port, mem_mb=mem_mb, threads=threads,
                      log_path=worker_log_path(cache_root(), host, port), say=lambda line: print(line, flush=True))
    return TaskResult((f"rpc-worker {host}:{port} stopped (exit {code})",))


def eval_models(recipe_path: Path) -> TaskResult:
    from moeprune.eval import run_eval
    from moeprune.eval.results import summary_lines

    recipe = _load(recipe_path, "eval", check_inputs=False)
    layout = RunLayout.for_recipe(recipe.name)
    results = run_eval(recipe, layout)
    return TaskResult((*summary_lines(results), f"wrote {layout.results_path}"), data=results)


def card(recipe_path: Path) -> TaskResult:
    from moeprune.card.render import run_card

    recipe = _load(recipe_path, "card", check_inputs=False)
    readme = run_card(recipe, RunLayout.for_recipe(recipe.name))
    return TaskResult((f"wrote {readme}",))


def manifest(recipe_path: Path) -> TaskResult:
    """The manifest as the pipeline's manifest stage writes it: the same repo ids, and the record
    of the llama.cpp build the stages used."""
    from moeprune.llamacpp.build import ensure_llamacpp
    from moeprune.manifest import run_manifest

    recipe = _load(recipe_path, "manifest", check_inputs=False)
    layout = RunLayout.for_recipe(recipe.name)
    written = run_manifest(recipe, layout, tools={"llamacpp": ensure_llamacpp(recipe.llamacpp).record})
    return TaskResult((f"wrote {layout.manifest_path} ({len(written['files'])} files)",))


def stage(name: str, recipe_path: Path) -> TaskResult:
    """One pipeline stage here, outside the stage cache (``run.lock.json``): what ``--runner docker``
    runs in the image. The task holds the run's writer lock, or works under that of the reproduce
    that started it (moeprune.runlock)."""
    from moeprune.pipeline.stages import run_single_stage

    recipe = _load(recipe_path, name)
    headline = run_single_stage(name, _context(recipe))
    return TaskResult((f"stage {name} done {headline}",), data=headline)


def compare_criteria(recipe_path: Path, docs_dir: Path, limit: int | None = None, accuracy: bool = True,
                     recalibrate: bool = True) -> TaskResult:
    from moeprune.demo.criteria import run_compare_criteria

    recipe = _load(recipe_path, "dropmap", check_inputs=False)
    result = run_compare_criteria(recipe, RunLayout.for_recipe(recipe.name), docs_dir, limit=limit, accuracy=accuracy,
                                  recalibrate=recalibrate)
    return TaskResult(data=result)  # it logs as it goes


def reproduce(recipe_path: Path, *, runner: str | None = None, force: bool = False, from_stage: str | None = None,
              until_stage: str | None = None, live: bool = True, ignore_disk_plan: bool = False) -> TaskResult:
    from moeprune.pipeline.reproduce import reproduce as run_pipeline

    results = run_pipeline(load_recipe(recipe_path), runner_kind=runner, force=force, from_stage=from_stage,
                           until_stage=until_stage, live=live, ignore_disk_plan=ignore_disk_plan)
    failed = [r.name for r in results if r.status == "failed"]
    failure = f"stage {', '.join(failed)} failed (its error is in the summary above)" if failed else None
    return TaskResult(failure=failure, data=results)


# --- publish and audit -----------------------------------------------------------------------
def publish(recipe_path: Path, repo_id: str | None = None, gguf_repo_id: str | None = None, *,
            dry_run: bool = False, endpoint: str | None = None, audit: bool = True) -> TaskResult:
    from moeprune.publish import print_report, publish as publish_run

    recipe = _load(recipe_path, "publish", check_inputs=False)
    target = repo_id or recipe.publish.repo_id
    if not target:
        raise MoepruneError("no repo id: pass --repo-id or set publish.repo_id in the recipe")
    report = publish_run(
        RunLayout.for_recipe(recipe.name), recipe.settings(), target, gguf_repo_id or recipe.publish.gguf_repo_id,
        dry_run=dry_run, endpoint=endpoint, private=recipe.publish.private, audit=audit,
    )
    print_report(report)
    return TaskResult(data=report)


def verify(target: str, base: Path | None = None, endpoint: str | None = None, revision: str | None = None) -> TaskResult:
    from moeprune.verify import print_report, verify as verify_artifact

    report = verify_artifact(target, base, endpoint=endpoint, revision=revision)
    print_report(report)
    return TaskResult(failure=None if report.ok else f"verification of {target} failed (see the table above)",
                      data=report)


def audit(source: str, base: Path | None = None, *, reprofile: Path | None = None, json_path: Path | None = None,
          revision: str | None = None, endpoint: str | None = None) -> TaskResult:
    from moeprune.audit import audit as run_audit, print_report, write_report_json

    report = run_audit(source, base, reprofile=reprofile, revision=revision, endpoint=endpoint)
    print_report(report)
    lines = ()
    if json_path:
        write_report_json(report, json_path)
        lines = (f"wrote {json_path}",)
    return TaskResult(lines, failure=None if report.ok else f"the audit of {source} found a mismatch (see the table above)",
                      data=report)


# --- demo and image --------------------------------------------------------------------------
def demo_model(out: Path | None = None, seed: int = 0, steps: int | None = None, threads: int = 1) -> TaskResult:
    from moeprune.demo import HELDOUT_PATH, MODEL_DIR
    from moeprune.demo.build import DEFAULT_STEPS, build_demo_model

    out = out or MODEL_DIR
    # The shipped demo_mcq dataset belongs to the shipped model: a model built elsewhere gets its
    # held-out questions beside it, never over the packaged ones.
    shipped = out.resolve() == MODEL_DIR.resolve()
    heldout_path = HELDOUT_PATH if shipped else out.parent / f"{out.name}.demo_mcq.jsonl"
    record = build_demo_model(out, seed=seed, steps=DEFAULT_STEPS if steps is None else steps, threads=threads,
                              heldout_path=heldout_path)
    heldout = record["heldout"]
    return TaskResult((
        f"wrote {out}: {record['model']['num_parameters']} parameters, "
        f"{record['model']['num_shards']} shards, {record['model']['weights_bytes']} bytes; held-out accuracy "
        f"{heldout['accuracy']:.3f} on {heldout['num_questions']} questions; {record['wall_s']:.0f} s",
        f"held-out questions (the demo_mcq dataset of this model): {heldout_path}",
    ), data=record)


def docker_build(project_root: Path, recipe_path: Path, *, cpu: bool = False, tag: str | None = None,
                 jobs: int | None = None) -> TaskResult:
    from moeprune.runner.image import build_image

    recipe = load_recipe(recipe_path, check_inputs=False)
    built = build_image(project_root, cpu=cpu, llamacpp=recipe.llamacpp, tag=tag,
                        jobs=jobs)
    state = "reused" if built.reused else "built"
    return TaskResult((f"{state} {built.tag}: {built.record['id']} in {built.seconds} s",), data=built)


def docker_lock(project_root: Path, variant: str = "all") -> TaskResult:
    from moeprune.runner.image import LOCK_FILES, lock_requirements

    written = [lock_requirements(project_root, name) for name in (sorted(LOCK_FILES) if variant == "all" else [variant])]
    return TaskResult(tuple(f"wrote {path}" for path in written))


def docker_shell_command(recipe_path: Path, image: str | None = None) -> list[str]:
    from moeprune.runner import DockerRunner, get_runner

    runner = get_runner("docker", load_recipe(recipe_path, check_inputs=False), image=image)
    if not isinstance(runner, DockerRunner):
        raise MoepruneError("already inside the moeprune image: there is no image to open a shell in")
    return runner.shell_command()


# --- shared ----------------------------------------------------------------------------------
def _base_dir(recipe: Recipe) -> Path:
    from moeprune.base_model import resolve_base

    return resolve_base(recipe).local_dir
