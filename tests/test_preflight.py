"""Preflight through `invoke check`: each refusal names its field, before any work is done."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from invoke_cli import invoke

from moeprune.base_model import resolve_base
from moeprune.preflight import CHECKS, PreflightError, checks_for, preflight, require_preflight
from moeprune.recipe import load_recipe
from moeprune.demo import MODEL_DIR as DEMO_MODEL

ROOT = Path(__file__).resolve().parents[1]
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def demo_recipe_text() -> str:
    """recipes/demo.toml with absolute paths, so a copy works from any directory."""
    text = (ROOT / "recipes" / "demo.toml").read_text()
    return text.replace('"../', f'"{ROOT}/')


def write_recipe(tmp_path: Path, text: str, name: str = "r.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def replace_once(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, old
    return text.replace(old, new)


def check(recipe: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`invoke check --recipe RECIPE`, in this process (its report is tested, not the process start)."""
    return invoke("check", "--recipe", str(recipe), env=env, in_process=True)


def refused(result: subprocess.CompletedProcess) -> str:
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "Traceback" not in output, output
    return result.stderr


def test_demo_recipe_passes_every_check():
    recipe = load_recipe(ROOT / "recipes" / "demo.toml")
    report = preflight(recipe)
    assert report.ok, report.errors
    assert report.checked == len(CHECKS) == 12 and report.warnings == []


def test_gpu_layers_slots_and_budget_refused_together_naming_each_field(tmp_path: Path):
    text = demo_recipe_text()
    text = replace_once(text, "n_gpu_layers = 0", "n_gpu_layers = 99")
    text = replace_once(text, "parallel = 1", "parallel = 4\nkv_unified = false")
    text = replace_once(text, "num_concurrent = 1", "num_concurrent = 4")
    text = replace_once(text, "reasoning_budget = 64", "reasoning_budget = 128")
    text += '\n[llamacpp]\ncuda = "off"\n'
    stderr = refused(check(write_recipe(tmp_path, text)))
    assert "field 'serve.n_gpu_layers' = 99: the llama.cpp build would be CPU-only" in stderr
    assert "field 'serve.ctx_size' = 2048 / serve.parallel = 4 slots gives each slot 512 tokens" in stderr
    assert "eval.max_gen_toks = 128" in stderr
    assert "field 'serve.reasoning_budget' = 128: not below eval.max_gen_toks = 128" in stderr


def test_gpu_layers_with_auto_and_no_gpu_is_refused(tmp_path: Path):
    """cuda = "auto" on a machine without nvcc/GPU would build CPU-only: refused, not silently slow."""
    text = replace_once(demo_recipe_text(), "n_gpu_layers = 0", "n_gpu_layers = 1")
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    for tool in ("python3", "git"):
        found = shutil.which(tool)
        if found:
            (fake_bin / tool).symlink_to(found)
    stderr = refused(check(write_recipe(tmp_path, text), env={"PATH": str(fake_bin)}))
    assert "field 'serve.n_gpu_layers' = 1" in stderr and 'llamacpp.cuda = "auto"' in stderr


def test_cuda_on_without_nvcc_is_refused_naming_the_field(tmp_path: Path):
    text = replace_once(demo_recipe_text(), "n_gpu_layers = 0", "n_gpu_layers = 99") + '\n[llamacpp]\ncuda = "on"\n'
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    stderr = refused(check(write_recipe(tmp_path, text), env={"PATH": str(fake_bin)}))
    assert "field 'llamacpp.cuda' = \"on\"" in stderr and "nvcc" in stderr


def test_unified_kv_cache_lets_every_slot_use_the_whole_context():
    recipe = load_recipe(ROOT / "recipes" / "demo.toml")
    serve = recipe.serve.model_copy(update={"parallel": 4, "kv_unified": False})
    split = preflight(recipe.model_copy(update={"serve": serve}), ["eval"])
    assert any("serve.ctx_size" in e for e in split.errors)
    unified = serve.model_copy(update={"kv_unified": True})  # llama-server --kv-unified
    assert preflight(recipe.model_copy(update={"serve": unified}), ["eval"]).ok


def test_strict_types_are_refused_naming_the_fields(tmp_path: Path):
    text = replace_once(demo_recipe_text(), "ctx_size = 2048", 'ctx_size = "2048"')
    text = replace_once(text, "enable_thinking = true", 'enable_thinking = "no"')
    stderr = refused(check(write_recipe(tmp_path, text)))
    assert "field 'serve.ctx_size' = \"2048\": Input should be a valid integer" in stderr
    assert "field 'calibration.enable_thinking' = \"no\": Input should be a valid boolean" in stderr


def test_dense_model_is_refused_from_its_config(tmp_path: Path):
    dense = tmp_path / "dense"
    shutil.copytree(DEMO_MODEL, dense, ignore=shutil.ignore_patterns("*.safetensors"))
    config = json.loads((dense / "config.json").read_text())
    for key in ("num_experts", "top_k_experts", "enable_moe_block"):
        config["text_config"].pop(key, None)
    (dense / "config.json").write_text(json.dumps(config))
    text = replace_once(demo_recipe_text(), f'base = "{ROOT}/src/moeprune/demo/model"', f'base = "{dense}"')
    stderr = refused(check(write_recipe(tmp_path, text)))
    assert "field 'model.base'" in stderr and "not a mixture-of-experts model" in stderr
    assert not list(dense.glob("*.safetensors")), "no weights were needed"


@pytest.mark.parametrize(
    ("lines", "needle"),
    [
        (['{"id": "math-01", "domain": "math", "prompt": "What is 7 times 8?"', None], "not valid JSON"),
        ([None, '{"id": "x-1", "domain": "math", "prompt": ""}'], "empty"),
        ([None, '{"id": "x-1", "domain": "math", "prompt": 5}'], "must be a string"),
    ],
)
def test_malformed_calibration_lines_are_refused(tmp_path: Path, lines, needle):
    original = (ROOT / "calibration" / "demo.jsonl").read_text().splitlines()
    first, extra = lines
    body = ([first] + original[1:]) if first else list(original)
    if extra:
        body.append(extra)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(body) + "\n")
    text = replace_once(demo_recipe_text(), f'prompts = "{ROOT}/calibration/demo.jsonl"', f'prompts = "{prompts}"')
    stderr = refused(check(write_recipe(tmp_path, text)))
    assert "field 'calibration.prompts'" in stderr and needle in stderr, stderr


def test_calibration_without_prompts_is_refused(tmp_path: Path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n\n")
    text = replace_once(demo_recipe_text(), f'prompts = "{ROOT}/calibration/demo.jsonl"', f'prompts = "{prompts}"')
    stderr = refused(check(write_recipe(tmp_path, text)))
    assert "field 'calibration.prompts'" in stderr


def test_too_long_calibration_prompt_is_refused_with_the_tokenizer_only(tmp_path: Path):
    lines = (ROOT / "calibration" / "demo.jsonl").read_text().splitlines()
    record = json.loads(lines[0])
    record["prompt"] = "seven times eight is what number " * 1200
    lines[0] = json.dumps(record)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(lines) + "\n")
    text = replace_once(demo_recipe_text(), f'prompts = "{ROOT}/calibration/demo.jsonl"', f'prompts = "{prompts}"')
    stderr = refused(check(write_recipe(tmp_path, text)))
    match = re.search(rf"prompt '{re.escape(record['id'])}' is (\d+) tokens through the chat template; with "
                      r"calibration.max_new_tokens = "
                      r"(\d+) it exceeds the model's context of 4096 tokens", stderr)
    assert match and int(match.group(1)) > 4096 - int(match.group(2)), stderr
    assert "field 'calibration.prompts'" in stderr


def test_each_stage_checks_only_what_concerns_it():
    recipe = load_recipe(ROOT / "recipes" / "demo.toml")
    assert checks_for(recipe, ["eval-pruned"]) == ["gpu-build", "slots", "eval-tasks"]
    assert checks_for(recipe, ["profile"]) == ["moe-model", "expert-shapes", "calibration", "revision"]
    assert checks_for(recipe, ["dropmap"]) == ["moe-model", "drop-counts", "revision"]
    assert checks_for(recipe, ["convert-base"]) == ["convertible", "revision"]
    assert checks_for(recipe, ["kld"]) == ["kld-text"]
    assert checks_for(recipe, ["card", "manifest"]) == []
    assert checks_for(recipe, None) == ["gpu-build", "slots", "moe-model", "expert-shapes", "drop-counts", "convertible",
                                        "calibration", "eval-tasks", "kld-text", "revision", "recalibrate-objective",
                                        "rpc-workers"]
    assert checks_for(recipe, ["recalibrate"]) == ["moe-model", "recalibrate-objective"]


def test_a_stage_task_refuses_before_any_work(tmp_path: Path):
    text = replace_once(demo_recipe_text(), "parallel = 1", "parallel = 8\nkv_unified = false")
    text = replace_once(text, "num_concurrent = 1", "num_concurrent = 8")
    runs = tmp_path / "runs"
    result = invoke("eval", "--recipe", str(write_recipe(tmp_path, text)), env={"MOEPRUNE_RUNS_DIR": str(runs)})
    stderr = refused(result)
    assert "refused before any work" in stderr and "serve.ctx_size" in stderr
    assert not runs.exists()


def test_reproduce_refuses_before_the_first_stage(tmp_path: Path):
    text = replace_once(demo_recipe_text(), "parallel = 1", "parallel = 8\nkv_unified = false")
    text = replace_once(text, "num_concurrent = 1", "num_concurrent = 8")
    runs = tmp_path / "runs"
    result = invoke("reproduce", "--no-live", "--recipe", str(write_recipe(tmp_path, text)),
                    env={"MOEPRUNE_RUNS_DIR": str(runs)})
    assert "serve.ctx_size" in refused(result)
    assert not runs.exists(), "no stage ran"


# --- a Hub base: the revision becomes the commit ---------------------------------------------
def fake_hub_cache(cache: Path, repo_id: str, revision: str, commit: str) -> Path:
    """The HF cache layout of a downloaded repo: refs/<revision> -> snapshots/<commit>/."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / revision).write_text(commit)
    snapshot = repo / "snapshots" / commit
    shutil.copytree(DEMO_MODEL, snapshot, ignore=shutil.ignore_patterns("*.safetensors"))
    for shard in DEMO_MODEL.glob("*.safetensors"):  # as the HF cache does: links into its blobs
        (snapshot / shard.name).symlink_to(shard)
    return snapshot


def hub_recipe(tmp_path: Path, revision: str) -> Path:
    text = replace_once(demo_recipe_text(), f'base = "{ROOT}/src/moeprune/demo/model"',
                        f'base = "someone/demo-moe"\nrevision = "{revision}"')
    return write_recipe(tmp_path, text)


def test_branch_revision_is_resolved_to_the_commit_downloaded(tmp_path: Path, monkeypatch):
    snapshot = fake_hub_cache(tmp_path / "hub", "someone/demo-moe", "main", COMMIT)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # read at import time otherwise
    recipe = load_recipe(hub_recipe(tmp_path, "main"), check_inputs=False)
    base = resolve_base(recipe, download=False)
    assert base.local_dir == snapshot and base.commit == COMMIT and base.revision == "main"
    assert base.record() == {"id": "someone/demo-moe", "revision": COMMIT}


def check_hub(recipe: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """`invoke check` in a process of its own: huggingface_hub reads HF_HUB_CACHE when first
    imported, which in this process happened long before."""
    return invoke("check", "--recipe", str(recipe), env=env)


def test_check_warns_on_a_branch_name_and_passes_a_commit(tmp_path: Path):
    fake_hub_cache(tmp_path / "hub", "someone/demo-moe", "main", COMMIT)
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    result = check_hub(hub_recipe(tmp_path, "main"), env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "warning: field 'model.revision' = \"main\" is a branch or tag name" in result.stdout
    pinned = check_hub(hub_recipe(tmp_path, COMMIT), env=env)
    assert pinned.returncode == 0, pinned.stdout + pinned.stderr
    assert "model.revision" not in pinned.stdout + pinned.stderr


def test_require_preflight_raises_with_every_problem():
    recipe = load_recipe(ROOT / "recipes" / "demo.toml")
    serve = recipe.serve.model_copy(update={"parallel": 16, "kv_unified": False, "reasoning_budget": 500})
    with pytest.raises(PreflightError, match=r"(?s)refused before any work:.*serve.ctx_size.*serve.reasoning_budget"):
        require_preflight(recipe.model_copy(update={"serve": serve}), ["eval"])


def test_card_links_the_commit_of_a_hub_base():
    from moeprune.card.render import card_context

    recipe = load_recipe(ROOT / "recipes" / "demo.toml").settings()
    context = card_context(recipe, "someone/demo-moe", {"moeprune": "0.1.0"}, COMMIT)
    assert context["base_link"] == (f"[someone/demo-moe](https://huggingface.co/someone/demo-moe/tree/{COMMIT}) "
                                    f"(commit `{COMMIT[:12]}`)")


def test_manifest_records_the_commit_the_drop_map_recorded(tmp_path: Path):
    sys.path.insert(0, str(ROOT / "tests"))
    from fakerun import make_fake_run

    from moeprune.manifest import run_manifest
    from moeprune.schemas import validate

    run = make_fake_run(tmp_path, with_manifest=False)
    drop_map = json.loads(run.layout.drop_map_path.read_text())
    assert "base_model" not in run_manifest(run.recipe, run.layout), "a local base has no commit to record"
    drop_map["base_model"].update({"id": "someone/demo-moe", "revision": COMMIT})
    run.layout.drop_map_path.write_text(json.dumps(drop_map))
    manifest = run_manifest(run.recipe, run.layout)
    assert manifest["base_model"] == {"id": "someone/demo-moe", "revision": COMMIT}
    validate("manifest", manifest)


# --- the server's own warning ------------------------------------------------------------------
@pytest.mark.llamacpp
def test_server_no_usable_gpu_warning_is_an_error_with_gpu_layers(tmp_path: Path):
    """llama-server only warns that it cannot offload, then runs on the CPU: with n_gpu_layers > 0
    that is refused (and the server stopped); with 0 it is what was asked for."""
    from moeprune.llamacpp import LlamaServer, convert_to_gguf, ensure_llamacpp
    from moeprune.llamacpp.server import LlamaServerError, process_group_members
    from moeprune.recipe import LlamaCppSection, ServeSection

    build = ensure_llamacpp(LlamaCppSection(cuda="off"))
    if build.cuda:
        pytest.skip("this llama.cpp build has CUDA")
    gguf = tmp_path / "demo-F32.gguf"
    convert_to_gguf(build, DEMO_MODEL, gguf, "f32", log_path=tmp_path / "convert.log")
    serve = ServeSection(ctx_size=512, n_gpu_layers=1, reasoning_budget=16, threads=1, startup_timeout_s=120)
    server = LlamaServer(build, gguf, serve, tmp_path / "server.log")
    with pytest.raises(LlamaServerError, match=r"serve.n_gpu_layers = 1, but llama-server found no usable GPU"):
        server.start()
    assert server.process is not None and server.process.poll() is not None
    assert process_group_members(server.process.pid) == []
    with LlamaServer(build, gguf, serve.model_copy(update={"n_gpu_layers": 0}), tmp_path / "cpu.log") as cpu:
        assert cpu.port is not None  # healthy: the CPU was asked for


def test_model_kl_recalibration_on_a_family_without_a_relaxed_router_is_refused(tmp_path: Path):
    """objective = "model-kl" rewrites the router's forward for Gemma 4's router only: another
    family is refused by invoke check (and so before reproduce's profile), naming the field."""
    base = tmp_path / "qwen"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "num_experts": 8,
        "num_experts_per_tok": 2, "num_hidden_layers": 2, "hidden_size": 32, "moe_intermediate_size": 16,
        "vocab_size": 64}))
    (tmp_path / "text.jsonl").write_text('{"text": "a b c"}\n')
    text = re.sub(r'(?m)^base = ".*"$', f'base = "{base}"', demo_recipe_text(), count=1)
    section = f'[recalibrate]\nenabled = true\nobjective = "model-kl"\ntext = "{tmp_path / "text.jsonl"}"\n'
    stderr = refused(check(write_recipe(tmp_path, text + "\n" + section)))
    assert "field 'recalibrate.objective' = \"model-kl\": the Qwen3-MoE router has no relaxed top-k" in stderr
    gemma = write_recipe(tmp_path, demo_recipe_text() + "\n" + section, "gemma.toml")
    assert "recalibrate.objective" not in check(gemma).stderr
