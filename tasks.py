"""moeprune tasks. Run `invoke --list` for the list, `invoke --help TASK` for a task's flags.

Each task is thin: it parses its flags, loads the recipe, and calls one function of
``src/moeprune``. Every user-facing failure arrives as ``MoepruneError`` and leaves as
``invoke.Exit`` with its message, never as a traceback.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

from invoke import Collection, Exit, task

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "src"))  # usable from a source tree even before `pip install -e .`

from moeprune.errors import MoepruneError  # noqa: E402
from moeprune.recipe import Recipe, load_recipe  # noqa: E402

DEFAULT_RECIPE = "recipes/demo.toml"
RECIPE_HELP = f"Recipe TOML file (default: {DEFAULT_RECIPE})."


def user_errors(func):
    """Turn MoepruneError into a clean `Exit` with the message and exit code 1."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except MoepruneError as exc:
            raise Exit(f"error: {exc}", code=1) from None

    return wrapper


def _recipe(path: str | None, check_inputs: bool = True) -> Recipe:
    """Load --recipe (relative to the working directory), or the demo recipe by default."""
    return load_recipe(Path(path) if path else ROOT / DEFAULT_RECIPE, check_inputs=check_inputs)


RUNNER_HELP = "Where to run: native (here) or docker (the same command in the pinned image); default: the recipe's."


def _in_container_instead(runner: str | None, recipe: str | None, task_name: str) -> bool:
    """With --runner docker (or the recipe's [runner] kind = docker), run this same command in the
    image and return True; return False to run it here. Inside the image it always runs here."""
    from moeprune.runner import get_runner, in_container, recipe_mounts

    loaded = _recipe(recipe, check_inputs=False)
    if (runner or loaded.runner.kind) == "native" or in_container():
        return False
    argv = sys.argv[1:]
    argv = argv[argv.index(task_name):] if task_name in argv else [task_name]
    get_runner("docker", loaded).run_stage(argv, mounts=recipe_mounts(loaded))
    return True


@task(help={"k": "Only tests matching this pytest -k expression.", "fast": "Skip tests marked slow."})
def test(c, k="", fast=False):
    """Run the test suite (pytest)."""
    args = [sys.executable, "-m", "pytest", "tests"]
    if k:
        args += ["-k", repr(k)]
    if fast:
        args += ["-m", "'not slow'"]
    # The environment's own tools (hadolint, invoke) come first, activated or not.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    c.run(" ".join(args), pty=False, env={"PATH": path})


@task
@user_errors
def schema(c):
    """Regenerate schemas/recipe.schema.json from the typed recipe model."""
    from moeprune.atomic import write_json
    from moeprune.recipe import recipe_json_schema

    target = ROOT / "schemas" / "recipe.schema.json"
    write_json(target, recipe_json_schema())
    print(f"wrote {target.relative_to(ROOT)}")


@task(help={"recipe": RECIPE_HELP})
@user_errors
def check(c, recipe=None):
    """Validate a recipe and its inputs without running anything."""
    from moeprune.profile.memory_plan import check_memory_plan

    loaded = _recipe(recipe)
    print(f"recipe '{loaded.name}' is valid ({loaded.source_path})")
    for line in check_memory_plan(loaded):
        print(line)


@task(
    help={
        "recipe": RECIPE_HELP, "runner": RUNNER_HELP,
        "base": "Base model directory (default: the recipe's model.base).",
        "drop_map": "Drop map JSON (default: runs/<recipe>/expert_drop_metadata.json).",
        "out": "Output directory (default: runs/<recipe>/pruned).",
        "max_shard_bytes": "Largest shard in bytes (default: the recipe's prune.max_shard_bytes).",
    }
)
@user_errors
def prune(c, recipe=None, base=None, drop_map=None, out=None, max_shard_bytes=None, runner=None):
    """Write the pruned checkpoint: slice the experts the drop map keeps, copy the rest byte for byte."""
    from moeprune.layout import RunLayout
    from moeprune.prune.surgery import prune_checkpoint, resolve_base_dir

    loaded = _recipe(recipe, check_inputs=False)
    layout = RunLayout.for_recipe(loaded.name)
    record = prune_checkpoint(
        Path(base) if base else resolve_base_dir(loaded),
        Path(drop_map) if drop_map else layout.drop_map_path,
        Path(out) if out else layout.pruned_dir,
        int(max_shard_bytes) if max_shard_bytes else loaded.prune.max_shard_bytes,
    )
    print(
        f"wrote {record['out_dir']}: {record['num_experts']} -> {record['num_experts_kept']} experts in "
        f"{len(record['moe_layers'])} MoE layers, {len(record['shards'])} shard(s), "
        f"{record['total_size']} bytes of tensors, {record['elapsed_s']} s"
    )


@task(
    name="verify-prune",
    help={
        "recipe": RECIPE_HELP, "runner": RUNNER_HELP,
        "base": "Base model directory (default: the recipe's model.base).",
        "pruned": "Pruned model directory (default: runs/<recipe>/pruned).",
    },
)
@user_errors
def verify_prune(c, recipe=None, base=None, pruned=None, runner=None):
    """Prove the pruned checkpoint is the base minus the dropped experts, bit for bit."""
    from moeprune.layout import RunLayout
    from moeprune.prune.surgery import resolve_base_dir
    from moeprune.prune.verify import verify_prune as verify

    loaded = _recipe(recipe, check_inputs=False)
    report = verify(
        Path(base) if base else resolve_base_dir(loaded),
        Path(pruned) if pruned else RunLayout.for_recipe(loaded.name).pruned_dir,
    )
    print(report.render())
    if not report.ok:
        raise Exit("error: the pruned checkpoint differs from the base beyond the dropped experts", code=1)



WHICH_HELP = "Which model: 'pruned' (default) or 'base'."


@task(help={"recipe": RECIPE_HELP})
@user_errors
def llamacpp(c, recipe=None):
    """Build (or reuse) the pinned llama.cpp tools; print the cache key and path."""
    from moeprune.llamacpp.stages import build_stage

    loaded = _recipe(recipe, check_inputs=False)
    build, seconds = build_stage(loaded)
    source = build.record["source"]
    print(f"llama.cpp {source.get('kind')} {source.get('version') or source.get('url')} "
          f"(llama.cpp commit {source.get('llama_cpp_commit')})")
    print(f"key {build.key}: {build.bin_dir}")
    print(f"ready in {seconds:.2f} s (a fresh build took {build.record['build_seconds']} s)")


@task(help={"recipe": RECIPE_HELP, "runner": RUNNER_HELP, "which": WHICH_HELP, "hf_dir": "Checkpoint directory to convert (default: from --which)."})
@user_errors
def convert(c, recipe=None, which="pruned", hf_dir=None, runner=None):
    """Convert the pruned (or base) checkpoint to GGUF with the pinned convert_hf_to_gguf.py, then check it."""
    from moeprune.llamacpp.stages import convert_stage

    record = convert_stage(_recipe(recipe, check_inputs=False), which, Path(hf_dir) if hf_dir else None)
    checks = record["checks"]
    print(f"wrote {record['out_path']} ({record['size_bytes']} bytes, {record['outtype']}); "
          f"{checks['architecture']}.expert_count = {checks['expert_count']}, "
          f"{checks['expert_tensors_checked']} expert tensors checked")


@task(help={"recipe": RECIPE_HELP, "runner": RUNNER_HELP, "which": WHICH_HELP})
@user_errors
def quantize(c, recipe=None, which="pruned", runner=None):
    """Quantize the converted GGUF to every type in quantize.types (imatrix if quantize.imatrix)."""
    from moeprune.llamacpp.stages import quantize_stage

    for record in quantize_stage(_recipe(recipe, check_inputs=False), which):
        fallbacks = record["fallbacks"]
        print(f"wrote {record['out_path']} ({record['size_bytes']} bytes, {record['qtype']}); "
              f"{fallbacks['count']} tensor(s) fell back to another type")


@task(help={"recipe": RECIPE_HELP, "which": WHICH_HELP, "type": "GGUF type to serve (default: quantize.eval_type).",
            "port": "Port on 127.0.0.1 (default: a free one)."})
@user_errors
def serve(c, recipe=None, which="pruned", type=None, port=None):
    """Serve a GGUF with llama-server in the foreground (OpenAI-compatible API) until Ctrl-C."""
    from moeprune.llamacpp.stages import serve_stage

    serve_stage(_recipe(recipe, check_inputs=False), which, type, int(port) if port else None)


@task(
    help={
        "recipe": RECIPE_HELP, "runner": RUNNER_HELP,
        "strategy": "Override dropmap.strategy: uniform-min-retention, uniform-count or per-layer-retention.",
        "criterion": "Override dropmap.criterion: contribution-sum, sequence-norm-sum, reap-mean, frequency, domain-max or random.",
        "threshold": "Override dropmap.retention_threshold, in (0, 1] (e.g. 0.99).",
        "keep_count": "Override dropmap.keep_count (uniform-count).",
        "protect_top_k": "Override dropmap.protect_top_k: always keep each layer's top-K experts.",
        "seed": "Override dropmap.seed (random criterion).",
    }
)
@user_errors
def dropmap(c, recipe=None, strategy=None, criterion=None, threshold=None, keep_count=None, protect_top_k=None,
            seed=None, runner=None):
    """Choose the experts to drop from the profile; write expert_drop_metadata.json and print retention per layer."""
    from rich.console import Console

    from moeprune.dropmap.stage import run_dropmap, with_dropmap_overrides
    from moeprune.layout import RunLayout

    loaded = with_dropmap_overrides(
        _recipe(recipe, check_inputs=False),
        strategy=strategy,
        criterion=criterion,
        retention_threshold=float(threshold) if threshold is not None else None,
        keep_count=int(keep_count) if keep_count is not None else None,
        protect_top_k=int(protect_top_k) if protect_top_k is not None else None,
        seed=int(seed) if seed is not None else None,
    )
    run_dropmap(loaded, RunLayout.for_recipe(loaded.name), console=Console())


@task(
    name="compare-criteria",
    help={
        "recipe": RECIPE_HELP,
        "docs_dir": "Where criteria.md, criteria.png and criteria.json go (default: docs).",
        "limit": "Use only the first N held-out examples.",
        "accuracy": "Also measure greedy held-out accuracy (slower).",
    },
)
@user_errors
def compare_criteria(c, recipe=None, docs_dir="docs", limit=None, accuracy=True):
    """Prune the model in memory per drop-map criterion (75% and 50% of experts) and compare held-out loss."""
    from moeprune.dropmap.compare import run_compare_criteria
    from moeprune.layout import RunLayout

    loaded = _recipe(recipe, check_inputs=False)
    run_compare_criteria(loaded, RunLayout.for_recipe(loaded.name), Path(docs_dir),
                         limit=int(limit) if limit else None, accuracy=accuracy)


@task(help={"recipe": RECIPE_HELP, "runner": RUNNER_HELP, "progress": "Show progress bars (default: on)."})
@user_errors
def profile(c, recipe=None, progress=True, runner=None):
    """Profile expert contributions: generate continuations (phase 1), replay them with hooks (phase 2)."""
    from moeprune.layout import RunLayout
    from moeprune.profile import run_profile

    loaded = _recipe(recipe)
    layout = RunLayout.for_recipe(loaded.name)
    summary = run_profile(loaded, layout, progress=progress)
    found = summary["findings"]
    print(f"profiled {summary['num_sequences']} sequences, {summary['num_tokens']} tokens, "
          f"{len(summary['moe']['layers'])} MoE layers -> {layout.profile_dir}")
    print(f"top-{found['top_share_k']} share {found['top_k_share_pooled']:.1%}, "
          f"experts to {found['coverage_fraction']:.0%}: {found['experts_to_coverage_mean']:.1f} (mean), "
          f"Gini {found['gini_mean']:.2f} (mean over layers)")


@task(help={"recipe": RECIPE_HELP, "runner": RUNNER_HELP})
@user_errors
def card(c, recipe=None, runner=None):
    """Render the model card (README.md, card_numbers.json, plots) from the run's artifacts."""
    from moeprune.card.render import run_card
    from moeprune.layout import RunLayout

    loaded = _recipe(recipe, check_inputs=False)
    print(f"wrote {run_card(loaded, RunLayout.for_recipe(loaded.name))}")


@task(help={"recipe": RECIPE_HELP, "runner": RUNNER_HELP})
@user_errors
def manifest(c, recipe=None, runner=None):
    """Write runs/<name>/manifest.json: every artifact file with size and sha256, plus provenance."""
    from moeprune.layout import RunLayout
    from moeprune.manifest import write_manifest

    loaded = _recipe(recipe, check_inputs=False)
    repo_ids = {"model": loaded.publish.repo_id, "gguf": loaded.publish.gguf_repo_id}
    print(f"wrote {write_manifest(RunLayout.for_recipe(loaded.name), loaded.settings(), {'repo_ids': repo_ids})}")


@task(
    help={
        "recipe": RECIPE_HELP,
        "repo_id": "Hub repo for the safetensors artifact (default: publish.repo_id).",
        "gguf_repo_id": "Hub repo for the GGUF files (default: publish.gguf_repo_id; none: GGUF not uploaded).",
        "dry_run": "List what would be uploaded, with sizes; contact nothing.",
        "endpoint": "Hub endpoint (default: https://huggingface.co).",
        "audit": "Run `verify` on the run first and refuse to upload on failure (default: on).",
    }
)
@user_errors
def publish(c, recipe=None, repo_id=None, gguf_repo_id=None, dry_run=False, endpoint=None, audit=True):
    """Validate, write the manifest and publish the run: one atomic commit per repo, then read back.

    The token comes from $HF_TOKEN or `hf auth login`."""
    from moeprune.layout import RunLayout
    from moeprune.publish import print_report, publish as publish_run

    loaded = _recipe(recipe, check_inputs=False)
    target = repo_id or loaded.publish.repo_id
    if not target:
        raise Exit("error: no repo id: pass --repo-id or set publish.repo_id in the recipe", code=1)
    report = publish_run(
        RunLayout.for_recipe(loaded.name), loaded.settings(), target, gguf_repo_id or loaded.publish.gguf_repo_id,
        dry_run=dry_run, endpoint=endpoint, private=loaded.publish.private, audit=audit,
    )
    print_report(report)


@task(
    help={
        "target": "A run directory (runs/<name>), a downloaded artifact, or a Hub repo id.",
        "base": "Base checkpoint directory: also check kept experts bit-exact against it.",
        "endpoint": "Hub endpoint for a repo id (default: https://huggingface.co).",
        "revision": "Hub revision for a repo id (default: main).",
    }
)
@user_errors
def verify(c, target, base=None, endpoint=None, revision=None):
    """Audit an artifact: hashes, schemas, every metric and card number recomputed; non-zero exit on failure."""
    from moeprune.verify import print_report, verify as verify_artifact

    report = verify_artifact(target, Path(base) if base else None, endpoint=endpoint, revision=revision)
    print_report(report)
    if not report.ok:
        raise Exit(code=1)


@task(
    help={
        "source": "Directory or Hub repo id (owner/name, optionally @revision) of the pruned model.",
        "base": "Base model directory: prove every kept expert and every other tensor bit-exact.",
        "reprofile": "Recipe of the claimed method: re-run the profile, compare kept sets and retention.",
        "json": "Also write the table of checks as JSON (schemas/audit.schema.json) to this file.",
        "revision": "Hub revision for a repo id (default: main).",
        "endpoint": "Hub endpoint for a repo id (default: https://huggingface.co).",
    }
)
@user_errors
def audit(c, source, base=None, reprofile=None, json=None, revision=None, endpoint=None):
    """Audit a pruned MoE (the seed's layout or moeprune's): weights, eval numbers, card claims; exit 1 on a mismatch."""
    from moeprune.audit import audit as run_audit, print_report, write_report_json

    report = run_audit(source, Path(base) if base else None, reprofile=Path(reprofile) if reprofile else None,
                       revision=revision, endpoint=endpoint)
    print_report(report)
    if json:
        write_report_json(report, Path(json))
        print(f"wrote {json}")
    if not report.ok:
        raise Exit(code=1)


# --- docker namespace: the pinned image (docker/README.md) ----------------------------------
@task(
    name="build",
    help={
        "cpu": "Build the CPU test image (Debian base from debootstrap, wheelhouse, no CUDA) instead of CUDA.",
        "recipe": RECIPE_HELP + " Its [llamacpp] section pins the llama.cpp source and CUDA architectures.",
        "tag": "Tag to give the image (default: moeprune:cuda, or moeprune:cpu with --cpu).",
        "jobs": "Parallel compile jobs for llama.cpp (default: 2).",
    },
)
@user_errors
def docker_build(c, cpu=False, recipe=None, tag=None, jobs=2):
    """Build (or reuse, when nothing changed) the moeprune Docker image."""
    from moeprune.runner.image import build_image

    loaded = _recipe(recipe, check_inputs=False)
    built = build_image(ROOT, cpu=cpu, llamacpp=loaded.llamacpp, tag=tag, jobs=int(jobs))
    state = "reused" if built.reused else "built"
    print(f"{state} {built.tag}: {built.record['id']} in {built.seconds} s")


@task(
    name="shell",
    help={
        "recipe": RECIPE_HELP,
        "image": "Image to open (default: the recipe's [runner] image).",
    },
)
@user_errors
def docker_shell(c, recipe=None, image=None):
    """Open an interactive shell in the image, with the recipe's mounts at the same paths as here."""
    import shlex

    from moeprune.runner import DockerRunner, get_runner

    runner = get_runner("docker", _recipe(recipe, check_inputs=False), image=image)
    assert isinstance(runner, DockerRunner)
    c.run(shlex.join(runner.shell_command()), pty=True, warn=True)


@task(name="lock", help={"variant": "Which lock: 'cuda' (docker/requirements.lock), 'cpu' or 'all' (default)."})
@user_errors
def docker_lock(c, variant="all"):
    """Regenerate the hash-locked requirements of the image from the project venv's versions."""
    from moeprune.runner.image import LOCK_FILES, lock_requirements

    for name in sorted(LOCK_FILES) if variant == "all" else [variant]:
        lock_requirements(ROOT, name)


@task(name="eval", help={"recipe": RECIPE_HELP, "runner": RUNNER_HELP})
@user_errors
def eval_(c, recipe=None, runner=None):
    """Evaluate base and pruned GGUFs with lm-eval against llama-server; write eval/results.json."""
    from moeprune.eval import run_eval
    from moeprune.eval.results import summary_lines
    from moeprune.layout import RunLayout

    loaded = _recipe(recipe, check_inputs=False)
    layout = RunLayout.for_recipe(loaded.name)
    results = run_eval(loaded, layout)
    for line in summary_lines(results):
        print(line)
    print(f"wrote {layout.results_path}")


STAGE_HELP = "Stage name (profile, dropmap, prune, convert-base, ..., manifest; see `invoke reproduce --help`)."


@task(
    help={
        "recipe": RECIPE_HELP,
        "force": "Rerun every selected stage even if its lock entry is valid.",
        "from": "Start at this stage (forced); earlier stages are not run and must be complete.",
        "until": "Stop after this stage.",
        "runner": "Where stages run: native (here) or docker (in the pinned image); default: the recipe's.",
        "live": "Show the live stage view (default: on).",
    }
)
@user_errors
def reproduce(c, recipe=None, force=False, from_=None, until=None, runner=None, live=True):
    """Run the whole pipeline (cached, resumable): profile -> ... -> card -> manifest."""
    from moeprune.pipeline.reproduce import reproduce as run_pipeline

    results = run_pipeline(_recipe(recipe), runner_kind=runner, force=force, from_stage=from_,
                           until_stage=until, live=live)
    failed = [r.name for r in results if r.status == "failed"]
    if failed:
        raise Exit(f"error: stage(s) failed: {', '.join(failed)}", code=1)


@task(help={"name": STAGE_HELP, "recipe": RECIPE_HELP, "runner": RUNNER_HELP})
@user_errors
def stage(c, name, recipe=None, runner=None):
    """Run one pipeline stage here, without the lock (what `--runner docker` runs in the image)."""
    from moeprune.layout import RunLayout
    from moeprune.pipeline.graph import Context
    from moeprune.pipeline.stages import run_single_stage

    loaded = _recipe(recipe)
    headline = run_single_stage(name, Context(recipe=loaded, layout=RunLayout.for_recipe(loaded.name)))
    print(f"stage {name} done {headline}")


@task(
    name="demo-model",
    help={
        "seed": "Seed of the tokenizer, the data, the initial weights and training (default: 0).",
        "steps": "Training steps; 0 writes an untrained model (default: the build's DEFAULT_STEPS).",
        "out": "Output model directory (default: src/moeprune/demo/model).",
        "threads": "CPU threads for torch (default: 1; more threads slow down on a busy machine).",
    },
)
@user_errors
def demo_model(c, seed=0, steps=None, out=None, threads=1):
    """Build and train the embedded demo MoE on CPU; write it atomically with its build record."""
    if _in_container_instead(runner, recipe, "stage"):
        return
    if _in_container_instead(runner, recipe, "eval"):
        return
    if _in_container_instead(runner, recipe, "manifest"):
        return
    if _in_container_instead(runner, recipe, "card"):
        return
    if _in_container_instead(runner, recipe, "profile"):
        return
    if _in_container_instead(runner, recipe, "dropmap"):
        return
    if _in_container_instead(runner, recipe, "quantize"):
        return
    if _in_container_instead(runner, recipe, "convert"):
        return
    if _in_container_instead(runner, recipe, "verify-prune"):
        return
    if _in_container_instead(runner, recipe, "prune"):
        return
    from moeprune.demo import HELDOUT_PATH, MODEL_DIR
    from moeprune.demo.build import DEFAULT_STEPS, build_demo_model

    record = build_demo_model(
        Path(out) if out else MODEL_DIR,
        seed=int(seed),
        steps=int(steps) if steps is not None else DEFAULT_STEPS,
        threads=int(threads),
        heldout_path=HELDOUT_PATH,
    )
    heldout = record["heldout"]
    print(
        f"wrote {Path(out) if out else MODEL_DIR}: {record['model']['num_parameters']} parameters, "
        f"{record['model']['num_shards']} shards, {record['model']['weights_bytes']} bytes; held-out accuracy "
        f"{heldout['accuracy']:.3f} on {heldout['num_questions']} questions; {record['wall_s']:.0f} s"
    )


docker_ns = Collection("docker", docker_build, docker_shell, docker_lock)

ns = Collection(test, schema, check, audit, prune, verify_prune, llamacpp, convert, quantize, serve, dropmap,
                compare_criteria, profile,
                card, manifest, publish, verify, eval_, reproduce, stage, demo_model)
ns.add_collection(docker_ns)
