"""moeprune tasks. Run `invoke --list` for the list, `invoke --help TASK` for a task's flags.

Each task is thin: it parses its flags and calls one function of ``moeprune.commands``, whose
result it prints. ``moeprune.cli.moeprune_task`` does the rest for every task alike: flags are
converted to their annotated types (a bad value is a one-line error naming the flag), a stage
task with ``--runner docker`` runs the same command in the pinned image, and a ``MoepruneError``
leaves as ``invoke.Exit`` with its message, never as a traceback.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Literal

from invoke import Collection, task

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "src"))  # usable from a source tree even before `pip install -e .`

from moeprune import commands  # noqa: E402
from moeprune.cli import moeprune_task  # noqa: E402
from moeprune.dropmap.types import CRITERIA, STRATEGIES  # noqa: E402
from moeprune.recipe import load_recipe  # noqa: E402

DEFAULT_RECIPE = "recipes/demo.toml"
RECIPE_HELP = f"Recipe TOML file (default: {DEFAULT_RECIPE})."
RUNNER_HELP = "Where to run: native (here) or docker (the same command in the pinned image); default: the recipe's."
WHICH_HELP = "Which model: 'pruned' (default) or 'base'."


def _one_of(names: tuple[str, ...]) -> str:
    """``a, b or c``: a list for a help text, from its one definition."""
    return f"{', '.join(names[:-1])} or {names[-1]}"
Runner = Literal["native", "docker"]
Which = Literal["pruned", "base"]


def _recipe_path(path: Path | str | None) -> Path:
    """--recipe (relative to the working directory), or the demo recipe by default."""
    return Path(path) if path else ROOT / DEFAULT_RECIPE


def _runner_recipe(path: Path | str | None):
    return load_recipe(_recipe_path(path), check_inputs=False)


def _run_of(flags: dict):
    """The run a task writes (its writer lock is held for the whole task): the recipe's."""
    from moeprune.layout import RunLayout

    return RunLayout.for_recipe(_runner_recipe(flags.get("recipe")).name)


def _existing_run_of(flags: dict):
    """The run publish rewrites (card, manifest); none when it does not exist (publish says so)."""
    layout = _run_of(flags)
    return layout if layout.root.is_dir() else None


WAIT_HELP = "If another process writes this run, wait for it to finish instead of failing at once."
# Every stage task writes the run (verify-prune, which only reads, is made with moeprune_task).
stage_task = functools.partial(moeprune_task, load_recipe=_runner_recipe, run_of=_run_of)


@task(help={
    "k": "Only tests matching this pytest -k expression.",
    "fast": "Only the fast tier: no demo reproduce, no family models, no llama.cpp build or server, no Docker "
            "(tests/conftest.py marks those slow from the fixtures they request).",
})
def test(c, k="", fast=False):
    """Run the test suite (pytest); --fast runs the tier that builds and starts nothing."""
    args = [sys.executable, "-m", "pytest", "tests"]
    if k:
        args += ["-k", repr(k)]
    if fast:
        args += ["-m", "'not slow'"]
    # The environment's own tools (hadolint, invoke) come first, activated or not.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    c.run(" ".join(args), pty=False, env={"PATH": path})


@moeprune_task()
def schema(c):
    """Regenerate schemas/recipe.schema.json from the typed recipe model."""
    return commands.write_recipe_schema(ROOT / "schemas" / "recipe.schema.json")


@moeprune_task(help={"recipe": RECIPE_HELP})
def check(c, recipe: Path | None = None):
    """Validate a recipe and everything a stage would refuse later, without running anything.

    Checks the types, the inputs, the GPU build against n_gpu_layers, the server slots against
    the generation budget, that the base is a MoE, the calibration prompts, the pinned revision."""
    return commands.check(_recipe_path(recipe))


@stage_task(
    help={
        "recipe": RECIPE_HELP, "runner": RUNNER_HELP, "wait": WAIT_HELP,
        "base": "Base model directory (default: the recipe's model.base).",
        "drop_map": "Drop map JSON (default: runs/<recipe>/expert_drop_metadata.json).",
        "out": "Output directory (default: runs/<recipe>/pruned).",
        "max_shard_bytes": "Largest shard in bytes (default: the recipe's prune.max_shard_bytes).",
    }
)
def prune(c, recipe: Path | None = None, base: Path | None = None, drop_map: Path | None = None,
          out: Path | None = None, max_shard_bytes: int | None = None, runner: Runner | None = None, wait: bool = False):
    """Write the pruned checkpoint: slice the experts the drop map keeps, copy the rest byte for byte."""
    return commands.prune(_recipe_path(recipe), base, drop_map, out, max_shard_bytes)


@moeprune_task(
    name="verify-prune", load_recipe=_runner_recipe,
    help={
        "recipe": RECIPE_HELP, "runner": RUNNER_HELP,
        "base": "Base model directory (default: the recipe's model.base).",
        "pruned": "Pruned model directory (default: runs/<recipe>/pruned).",
    },
)
def verify_prune(c, recipe: Path | None = None, base: Path | None = None, pruned: Path | None = None,
                 runner: Runner | None = None):
    """Prove the pruned checkpoint is the base minus the dropped experts, bit for bit."""
    return commands.verify_prune(_recipe_path(recipe), base, pruned)


@moeprune_task(help={"recipe": RECIPE_HELP,
                     "jobs": "Parallel compile jobs (default: llamacpp.jobs, else this machine's CPU count)."})
def llamacpp(c, recipe: Path | None = None, jobs: int | None = None):
    """Build (or reuse) the pinned llama.cpp tools; print the cache key and path."""
    return commands.llamacpp(_recipe_path(recipe), jobs)


@stage_task(help={"recipe": RECIPE_HELP, "runner": RUNNER_HELP, "wait": WAIT_HELP, "which": WHICH_HELP,
                  "hf_dir": "Checkpoint directory to convert (default: from --which)."})
def convert(c, recipe: Path | None = None, which: Which = "pruned", hf_dir: Path | None = None,
            runner: Runner | None = None, wait: bool = False):
    """Convert the pruned (or base) checkpoint to GGUF with the pinned convert_hf_to_gguf.py, then check it."""
    return commands.convert(_recipe_path(recipe), which, hf_dir)


@stage_task(help={"recipe": RECIPE_HELP, "runner": RUNNER_HELP, "wait": WAIT_HELP, "which": WHICH_HELP})
def quantize(c, recipe: Path | None = None, which: Which = "pruned", runner: Runner | None = None, wait: bool = False):
    """Quantize the converted GGUF to every type in quantize.types (imatrix if quantize.imatrix)."""
    return commands.quantize(_recipe_path(recipe), which)


@moeprune_task(help={"recipe": RECIPE_HELP, "which": WHICH_HELP,
                     "type": "GGUF type to serve (default: quantize.eval_type).",
                     "port": "Port on 127.0.0.1 (default: a free one)."})
def serve(c, recipe: Path | None = None, which: Which = "pruned", type: str | None = None, port: int | None = None):
    """Serve a GGUF with llama-server in the foreground (OpenAI-compatible API) until Ctrl-C."""
    return commands.serve(_recipe_path(recipe), which, type, port)


@moeprune_task(help={"recipe": RECIPE_HELP,
                     "host": "Address to listen on (default 127.0.0.1; another exposes an unauthenticated port).",
                     "port": "TCP port (default 50052); its build record is served on the next port (both must be open).",
                     "mem": "Refuse to serve unless the worker's devices have at least this many MiB free.",
                     "threads": "CPU threads of a CPU worker (default: rpc-server's, half the cores)."})
def rpc_worker(c, recipe: Path | None = None, host: str | None = None, port: int | None = None,
               mem: int | None = None, threads: int | None = None):
    """Serve this machine's devices to llama.cpp over RPC (recipe serve.rpc) until Ctrl-C."""
    return commands.rpc_worker(_recipe_path(recipe), host, port, mem, threads)


@stage_task(
    help={
        "recipe": RECIPE_HELP, "runner": RUNNER_HELP, "wait": WAIT_HELP,
        "strategy": f"Override dropmap.strategy: {_one_of(STRATEGIES)}.",
        "criterion": f"Override dropmap.criterion: {_one_of(CRITERIA)}.",
        "threshold": "Override dropmap.retention_threshold, in (0, 1] (e.g. 0.99).",
        "keep_count": "Override dropmap.keep_count (uniform-count).",
        "protect_top_k": "Override dropmap.protect_top_k: always keep each layer's top-K experts.",
        "seed": "Override dropmap.seed (random criterion).",
    }
)
def dropmap(c, recipe: Path | None = None, strategy: str | None = None, criterion: str | None = None,
            threshold: float | None = None, keep_count: int | None = None, protect_top_k: int | None = None,
            seed: int | None = None, runner: Runner | None = None, wait: bool = False):
    """Choose the experts to drop from the profile; write expert_drop_metadata.json and print retention per layer."""
    return commands.dropmap(_recipe_path(recipe), strategy=strategy, criterion=criterion,
                            retention_threshold=threshold, keep_count=keep_count, protect_top_k=protect_top_k,
                            seed=seed)


@moeprune_task(
    name="compare-criteria",
    help={
        "recipe": RECIPE_HELP,
        "docs_dir": "Where criteria.md, criteria.png and criteria.json go (default: docs).",
        "limit": "Use only the first N held-out examples.",
        "accuracy": "Also measure greedy held-out accuracy (slower).",
        "recalibrate": "Also measure each pruned model after the router recalibration (the recovery table).",
    },
)
def compare_criteria(c, recipe: Path | None = None, docs_dir: Path = Path("docs"), limit: int | None = None,
                     accuracy: bool = True, recalibrate: bool = True):
    """Prune the model in memory per drop-map criterion (75%, 62.5% and 50% of experts), with and without router
    recalibration, and compare held-out KLD, top-1 agreement and accuracy."""
    return commands.compare_criteria(_recipe_path(recipe), Path(docs_dir), limit, accuracy, recalibrate)


@stage_task(help={"recipe": RECIPE_HELP, "runner": RUNNER_HELP, "wait": WAIT_HELP, "progress": "Show progress bars (default: on)."})
def profile(c, recipe: Path | None = None, progress: bool = True, runner: Runner | None = None, wait: bool = False):
    """Profile expert contributions: generate continuations (phase 1), replay them with hooks (phase 2)."""
    return commands.profile(_recipe_path(recipe), progress)


@stage_task(help={"recipe": RECIPE_HELP, "runner": RUNNER_HELP, "wait": WAIT_HELP})
def card(c, recipe: Path | None = None, runner: Runner | None = None, wait: bool = False):
    """Render the model card (README.md, card_numbers.json, plots) from the run's artifacts."""
    return commands.card(_recipe_path(recipe))


@stage_task(help={"recipe": RECIPE_HELP, "runner": RUNNER_HELP, "wait": WAIT_HELP})
def manifest(c, recipe: Path | None = None, runner: Runner | None = None, wait: bool = False):
    """Write runs/<name>/manifest.json: every artifact file with size and sha256, plus provenance."""
    return commands.manifest(_recipe_path(recipe))


@moeprune_task(
    help={
        "recipe": RECIPE_HELP,
        "repo_id": "Hub repo for the safetensors artifact (default: publish.repo_id).",
        "gguf_repo_id": "Hub repo for the GGUF files (default: publish.gguf_repo_id; none: GGUF not uploaded).",
        "dry_run": "List what would be uploaded, with sizes; contact nothing.",
        "endpoint": "Hub endpoint (default: https://huggingface.co).",
        "audit": "Run `verify` on the run first and refuse to upload on failure (default: on).",
        "wait": WAIT_HELP,
    },
    run_of=_existing_run_of,  # it re-renders the card and rewrites the manifest of the run it uploads
)
def publish(c, recipe: Path | None = None, repo_id: str | None = None, gguf_repo_id: str | None = None,
            dry_run: bool = False, endpoint: str | None = None, audit: bool = True, wait: bool = False):
    """Validate, write the manifest and publish the run: one atomic commit per repo, then read back.

    The token comes from $HF_TOKEN or `hf auth login`."""
    return commands.publish(_recipe_path(recipe), repo_id, gguf_repo_id, dry_run=dry_run, endpoint=endpoint,
                            audit=audit)


@moeprune_task(
    help={
        "target": "A run directory (runs/<name>), a downloaded artifact, or a Hub repo id.",
        "base": "Base checkpoint directory: also check kept experts bit-exact against it.",
        "endpoint": "Hub endpoint for a repo id (default: https://huggingface.co).",
        "revision": "Hub revision for a repo id (default: main).",
    }
)
def verify(c, target: str, base: Path | None = None, endpoint: str | None = None, revision: str | None = None):
    """Audit an artifact: hashes, schemas, every metric and card number recomputed; non-zero exit on failure."""
    return commands.verify(target, base, endpoint, revision)


@moeprune_task(
    help={
        "source": "Directory or Hub repo id (owner/name, optionally @revision) of the pruned model.",
        "base": "Base model directory: prove every kept expert and every other tensor bit-exact.",
        "reprofile": "Recipe of the claimed method: re-run the profile, compare kept sets and retention.",
        "json": "Also write the table of checks as JSON (schemas/audit.schema.json) to this file.",
        "revision": "Hub revision for a repo id (default: main).",
        "endpoint": "Hub endpoint for a repo id (default: https://huggingface.co).",
    }
)
def audit(c, source: str, base: Path | None = None, reprofile: Path | None = None, json: Path | None = None,
          revision: str | None = None, endpoint: str | None = None):
    """Audit a pruned MoE (the seed's layout or moeprune's): weights, eval numbers, card claims; exit 1 on a mismatch."""
    return commands.audit(source, base, reprofile=reprofile, json_path=json, revision=revision, endpoint=endpoint)


# --- docker namespace: the pinned image (docker/README.md) ----------------------------------
@moeprune_task(
    name="build",
    help={
        "cpu": "Build the CPU test image (Debian base from debootstrap, wheelhouse, no CUDA) instead of CUDA.",
        "recipe": RECIPE_HELP + " Its [llamacpp] section pins the llama.cpp source and CUDA architectures.",
        "tag": "Tag to give the image (default: moeprune:cuda, or moeprune:cpu with --cpu).",
        "jobs": "Parallel compile jobs for llama.cpp (default: llamacpp.jobs, else this machine's CPU count).",
    },
)
def docker_build(c, cpu: bool = False, recipe: Path | None = None, tag: str | None = None, jobs: int | None = None):
    """Build (or reuse, when nothing changed) the moeprune Docker image."""
    return commands.docker_build(ROOT, _recipe_path(recipe), cpu=cpu, tag=tag, jobs=jobs)


@moeprune_task(
    name="shell",
    help={
        "recipe": RECIPE_HELP,
        "image": "Image to open (default: the recipe's [runner] image).",
    },
)
def docker_shell(c, recipe: Path | None = None, image: str | None = None):
    """Open an interactive shell in the image, with the recipe's mounts at the same paths as here."""
    import shlex

    c.run(shlex.join(commands.docker_shell_command(_recipe_path(recipe), image)), pty=True, warn=True)


@moeprune_task(name="lock", help={"variant": "Which lock: 'cuda' (docker/requirements.lock), 'cpu' or 'all' (default)."})
def docker_lock(c, variant: Literal["cuda", "cpu", "all"] = "all"):
    """Regenerate the hash-locked requirements of the image from the project venv's versions."""
    return commands.docker_lock(ROOT, variant)


@stage_task(name="eval", help={"recipe": RECIPE_HELP, "runner": RUNNER_HELP, "wait": WAIT_HELP})
def eval_(c, recipe: Path | None = None, runner: Runner | None = None, wait: bool = False):
    """Evaluate base and pruned GGUFs with lm-eval against llama-server; write eval/results.json."""
    return commands.eval_models(_recipe_path(recipe))


STAGE_HELP = "Stage name (profile, dropmap, prune, convert-base, ..., manifest; see `invoke reproduce --help`)."


@moeprune_task(
    help={
        "recipe": RECIPE_HELP,
        "force": "Rerun every selected stage even if its lock entry is valid.",
        "from": "Start at this stage (forced); earlier stages are not run and must be complete.",
        "until": "Stop after this stage.",
        "runner": "Where stages run: native (here) or docker (in the pinned image); default: the recipe's.",
        "live": "Show the live stage view (default: on).",
        "wait": WAIT_HELP,
        "ignore-disk-plan": "Run even when the disk plan says the run's filesystem cannot hold what remains.",
    },
    run_of=_run_of,
)
def reproduce(c, recipe: Path | None = None, force: bool = False, from_: str | None = None, until: str | None = None,
              runner: Runner | None = None, live: bool = True, wait: bool = False, ignore_disk_plan: bool = False):
    """Run the whole pipeline (cached, resumable): profile -> ... -> card -> manifest."""
    return commands.reproduce(_recipe_path(recipe), runner=runner, force=force, from_stage=from_,
                              until_stage=until, live=live, ignore_disk_plan=ignore_disk_plan)


@stage_task(help={"name": STAGE_HELP, "recipe": RECIPE_HELP, "runner": RUNNER_HELP, "wait": WAIT_HELP})
def stage(c, name: str, recipe: Path | None = None, runner: Runner | None = None, wait: bool = False):
    """Run one pipeline stage here, outside the stage cache (what `--runner docker` runs in the image).

    It holds the run's writer lock, unless the `invoke reproduce` that started it holds it."""
    return commands.stage(name, _recipe_path(recipe))


@moeprune_task(
    name="demo-model",
    help={
        "seed": "Seed of the tokenizer, the data, the initial weights and training (default: 0).",
        "steps": "Training steps; 0 writes an untrained model (default: the build's DEFAULT_STEPS).",
        "out": "Output model directory (default: src/moeprune/demo/model).",
        "threads": "CPU threads for torch (default: 1; more threads slow down on a busy machine).",
    },
)
def demo_model(c, seed: int | None = None, steps: int | None = None, out: Path | None = None,
               threads: int | None = None):
    """Build and train the embedded demo MoE on CPU; write it atomically with its build record."""
    return commands.demo_model(out, seed=seed or 0, steps=steps, threads=threads or 1)


docker_ns = Collection("docker", docker_build, docker_shell, docker_lock)

ns = Collection(test, schema, check, audit, prune, verify_prune, llamacpp, convert, quantize, serve, dropmap,
                compare_criteria, profile, card, manifest, publish, verify, eval_, reproduce, stage, demo_model,
                rpc_worker)
ns.add_collection(docker_ns)
