"""The whole-run plan: llama-quantize's type rules, sizes against real files, the reference plan,
and reproduce refusing a run its filesystem cannot hold (issue 26) before any stage runs; a
no-op reproduce imports neither torch nor transformers (issue 23)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from invoke_cli import invoke
from moeprune.pipeline.stages import build_pipeline
from moeprune.plan.disk import StagePlan, Write, first_shortfall
from moeprune.plan.ggml import GgufTensor, QuantModel, fallback_type, quantized_types

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "recipes" / "gemma-4-26b-a4b-109e.toml"
# The seed's card (shared/reference/gemma-4-A4B-109e-model-card.txt): "GGUF Q4_K_M size | 16 GB | 14 GB".
SEED_Q4_K_M_GB = {"base": 16.0, "pruned": 14.0}


def _invoke(args: list[str], env: dict[str, str], in_process: bool = True) -> subprocess.CompletedProcess:
    """``invoke ARGS`` (tests/invoke_cli.py): in this process for the plans and refusals, which load
    no model (transformers is imported once, not per call); in a subprocess for real runs."""
    return invoke(*args, env=env, timeout=1800, in_process=in_process)


def _readme_block(name: str) -> list[str]:
    """The lines of the README's ``<!-- name -->`` block (tool output pasted there)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    match = re.search(rf"<!-- {name} -->\n```\n(.*?)\n```\n<!-- /{name} -->", text, re.S)
    assert match, f"README.md has no {name} block"
    return match.group(1).splitlines()


# --- llama-quantize's rules ----------------------------------------------------------------------
def test_fallback_rule_is_llama_quants():
    assert fallback_type("Q4_K", 704) == "Q5_0"
    assert fallback_type("Q6_K", 704) == "Q8_0"
    assert fallback_type("Q4_K", 2816) == "Q4_K"
    assert fallback_type("Q5_K", 2112) == "Q5_1"
    assert fallback_type("IQ4_XS", 704) == "IQ4_NL"
    assert fallback_type("Q4_K", 100) == "F16"  # not even 32-divisible


def test_q4_k_m_types_at_reference_shapes():
    """Gemma-4-26B-A4B's 704-wide expert ffn_down_exps and 2112-wide dense ffn_down: Q4_K where
    the layer gets no extra bits falls back to Q5_0, Q6_K where it does falls back to Q8_0; rows of
    2816 keep their k-quant; the tied embedding gets the output tensor's Q6_K."""
    layers = 30
    tensors = [GgufTensor("token_embd.weight", 2816, 262144 * 2816, 2, "F16")]
    for i in range(layers):
        tensors += [GgufTensor(f"blk.{i}.attn_q.weight", 2816, 4096 * 2816, 2, "F16"),
                    GgufTensor(f"blk.{i}.ffn_down.weight", 2112, 2816 * 2112, 2, "F16"),
                    GgufTensor(f"blk.{i}.ffn_down_exps.weight", 704, 128 * 2816 * 704, 3, "F16"),
                    GgufTensor(f"blk.{i}.ffn_gate_inp.weight", 2816, 128 * 2816, 2, "F32"),
                    GgufTensor(f"blk.{i}.attn_norm.weight", 2816, 2816, 1, "F32")]
    types = dict(zip((t.name for t in tensors), quantized_types(tensors, "Q4_K_M", QuantModel(layers, 128, 2))))
    more_bits = [i for i in range(layers) if i < 3 or i >= 26 or (i - 3) % 3 == 2]
    assert types["token_embd.weight"] == "Q6_K"
    for i in range(layers):
        expected = "Q8_0" if i in more_bits else "Q5_0"
        assert types[f"blk.{i}.ffn_down_exps.weight"] == expected, i
        assert types[f"blk.{i}.ffn_down.weight"] == expected, i
        assert types[f"blk.{i}.attn_q.weight"] == "Q4_K"
        assert types[f"blk.{i}.ffn_gate_inp.weight"] == "F32"  # never quantized
        assert types[f"blk.{i}.attn_norm.weight"] == "F32"


# --- the fit decision ----------------------------------------------------------------------------
def test_replaced_output_is_freed_only_after_its_replacement_exists():
    fs = lambda path: "fs"  # noqa: E731
    out = Path("/run/x.gguf")
    stages = [StagePlan("convert", True, (Write("x", out, 60, old_bytes=60),)),
              StagePlan("quantize", True, (Write("y", Path("/run/y.gguf"), 30),))]
    # 60 new beside 60 old: the old 60 are in use already, so 60 free is enough for convert...
    assert first_shortfall(stages[:1], {"fs": 60}, fs) is None
    found = first_shortfall(stages[:1], {"fs": 59}, fs)
    assert (found.stage, found.short_bytes) == ("convert", 1)
    # ...and once renamed over the old file, its 60 are free again for quantize.
    assert first_shortfall(stages, {"fs": 60}, fs) is None
    skipped = [StagePlan("convert", False, stages[0].writes), stages[1]]
    assert first_shortfall(skipped, {"fs": 30}, fs) is None  # a cached stage writes nothing


# --- the reference recipe, offline -------------------------------------------------------------
def _reference_total_independent() -> tuple[int, int]:
    """Bytes a fresh reference run writes, from the model's dimensions alone (not the plan's code):
    30 layers of hidden 2816, sliding layers (5 of 6) with 16 q heads / 8 KV heads of 256, global
    layers with 16 q heads of 512 and 2 shared K=V heads, dense MLP 2112, 128 experts of 704,
    vocabulary 262144, tied embedding. Download and pruned checkpoint in bf16 (the pruned one at
    most the base: the recipe's threshold strategy chooses the count later), two f16 GGUFs and two
    Q4_K_M ones at llama.cpp's nominal 4.85 bits per weight for Q4_K_M; KLD's reference file (101
    chunks of 512, the second half of each scored, 2 bytes per vocabulary entry) and its three
    rivals at their nominal bits per weight (Q3_K_M 3.91, IQ4_XS 4.25, Q4_K_S 4.58). The vision
    projector (under 1 GB) is left out."""
    hidden, layers = 2816, 30
    text = 262144 * hidden
    for i in range(layers):
        if i % 6 == 5:
            attention = hidden * (16 * 512) * 2 + hidden * (2 * 512)
        else:
            attention = hidden * (16 * 256) * 2 + hidden * (8 * 256) * 2
        text += attention + 3 * hidden * 2112 + 128 * 3 * hidden * 704 + 128 * hidden
    kld = 101 * 256 * 262144 * 2 + sum(int(text * bpw / 8) for bpw in (3.91, 4.25, 4.58))
    return text, 2 * (2 * text) + 2 * (2 * text) + 2 * int(text * 4.85 / 8) + kld


def test_check_prints_the_reference_disk_plan_offline():
    result = _invoke(["check", "--recipe", str(REFERENCE)], {"MOEPRUNE_RUNS_DIR": "/nonexistent-runs"})
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "run plan of `invoke reproduce` (18 of 18 stages would run" in out
    assert "pinned config google--gemma-4-26B-A4B-it.json" in out
    assert re.search(r"download of google/gemma-4-26B-A4B-it to the HF cache \d+\.\d\d GB", out)
    total = int(re.search(r"total written: <= [\d.]+ GB \((\d+) bytes", out).group(1))
    stage_lines = [line for line in out.splitlines() if re.match(r"  [a-z-]+ +(disk|cached)", line)]
    assert len(stage_lines) == 18 and not any("not estimated" in line for line in stage_lines), stage_lines
    # llama-quantize's two 4-byte buffers of the largest tensor it quantizes: the tied embedding.
    assert f"RAM ~{8 * 262144 * 2816 / 1e9:.2f} GB (largest tensor token_embd.weight" in out
    text_params, independent = _reference_total_independent()
    print(f"plan total {total / 1e9:.1f} GB, independent {independent / 1e9:.1f} GB, "
          f"text parameters {text_params / 1e9:.2f} B")
    assert abs(total - independent) <= 0.15 * independent
    # The README's copy is this output (its header names the default runs directory).
    assert _readme_block("run-plan:reference")[1:] == [line for line in stage_lines + [
        line for line in out.splitlines() if line.startswith("  total written:")]]


def test_pinned_reference_config_is_what_its_generator_writes():
    """The shipped config is data made by bench/write_reference_shapes.py, byte for byte; the
    tensors the plan builds from it have the reference's dimensions."""
    import importlib.util

    from moeprune.plan.shapes import known_path, known_shapes

    spec = importlib.util.spec_from_file_location("write_reference_shapes", ROOT / "bench" / "write_reference_shapes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    path = known_path(module.HUB_ID)
    assert path.read_text(encoding="utf-8") == module.render(module.build())
    shapes = {t.name: t.shape for t in known_shapes(module.HUB_ID).tensors}
    layer = "model.language_model.layers.5."  # a global-attention layer
    assert shapes[layer + "experts.gate_up_proj"] == (128, 2 * 704, 2816)
    assert shapes[layer + "experts.down_proj"] == (128, 2816, 704)
    assert shapes[layer + "self_attn.q_proj.weight"] == (16 * 512, 2816)
    assert shapes[layer + "self_attn.k_proj.weight"] == (2 * 512, 2816)
    assert shapes["model.language_model.embed_tokens.weight"] == (262144, 2816)
    assert "lm_head.weight" not in shapes  # tied: stored once


def test_a_hub_base_with_unknown_shapes_is_planned_after_its_download(tmp_path):
    """No pinned config and not downloaded: check says the disk plan waits for the download (one
    line, no error), rather than failing or guessing."""
    from fakerun import demo_recipe_text

    text = demo_recipe_text()
    local = f'base = "{ROOT}/src/moeprune/demo/model"'
    assert text.count(local) == 1
    recipe = tmp_path / "hub.toml"
    recipe.write_text(text.replace(local, 'base = "example-org/not-downloaded-moe"\nrevision = "' + "0" * 40 + '"'))
    result = _invoke(["check", "--recipe", str(recipe)], {"MOEPRUNE_RUNS_DIR": str(tmp_path / "runs"),
                                                           "HF_HUB_CACHE": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert ("  disk plan: not computed (model.base = 'example-org/not-downloaded-moe' is not on disk and has no "
            "pinned config") in result.stdout, result.stdout[-2000:]


def test_predicted_q4_k_m_sizes_against_the_seed_card():
    from moeprune.plan.gather import gguf_size
    from moeprune.plan.shapes import known_shapes, pruned_shapes

    base = known_shapes("google/gemma-4-26B-A4B-it")
    pruned = pruned_shapes(base, 128, dict.fromkeys(range(30), 109))
    predicted = {"base": gguf_size(base, "f16", "Q4_K_M", 128), "pruned": gguf_size(pruned, "f16", "Q4_K_M", 109)}
    for which, size in predicted.items():
        print(f"{which} Q4_K_M: predicted {size / 1e9:.2f} GB ({size / 2**30:.2f} GiB), "
              f"seed card {SEED_Q4_K_M_GB[which]:.0f} GB")
        # The seed rounds to whole GB (or GiB: 15.6 GiB shows as 16): agree within 10%.
        assert abs(size / 1e9 - SEED_Q4_K_M_GB[which]) <= 0.10 * SEED_Q4_K_M_GB[which]
    assert predicted["pruned"] < predicted["base"]
    # The README's copy (bench/reference_sizes.py's output) shows these figures.
    readme = _readme_block("reference-sizes")
    assert any(line.startswith("GGUF Q4_K_M (tensor data)") and f"{predicted['base'] / 1e9:.2f} GB" in line
               and f"{predicted['pruned'] / 1e9:.2f} GB" in line for line in readme), readme
    assert any(line.startswith("bf16 checkpoint") and f"{base.total_bytes / 1e9:.2f} GB" in line
               and f"{pruned.total_bytes / 1e9:.2f} GB" in line for line in readme), readme


# --- predictions against a real run ------------------------------------------------------------
@pytest.mark.slow
def test_predicted_sizes_equal_the_demo_runs_files(demo_run):
    """Every GGUF of the demo run (converted, quantized, KLD rivals), the pruned checkpoint and the
    KLD reference file, predicted from shapes alone, against the files: the GGUFs' tensor data to
    within the one tensor the converter adds (rope_freqs, <= 1 KiB), the others exactly."""
    import gguf

    from moeprune.layout import RunLayout
    from moeprune.plan.gather import existing_bytes, gguf_size, kld_reference_bytes
    from moeprune.plan.shapes import pruned_shapes, read_shapes
    from moeprune.recipe import load_recipe

    recipe = load_recipe(ROOT / "recipes" / "demo.toml")
    layout = RunLayout(demo_run)
    base = read_shapes(recipe.base_dir)
    drop_map = json.loads(layout.drop_map_path.read_text())
    kept = {e["layer"]: len(e["keep"]) for e in drop_map["layers"]}
    pruned = pruned_shapes(base, drop_map["num_experts"], kept)
    assert pruned.total_bytes == sum(t.nbytes for t in read_shapes(layout.pruned_dir).tensors)
    outtype = recipe.quantize.convert_outtype
    files = {layout.gguf_path("base", outtype): (base, None), layout.gguf_path("pruned", outtype): (pruned, None)}
    for qtype in recipe.quantize.types:
        files[layout.gguf_path("base", qtype)] = (base, qtype)
        files[layout.gguf_path("pruned", qtype)] = (pruned, qtype)
    for qtype in recipe.kld.rival_types:
        files[layout.kld_work_dir / f"base-{qtype}.gguf"] = (base, qtype)
    for path, (shapes, qtype) in files.items():
        actual = sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors)
        experts = max(kept.values()) if shapes is pruned else drop_map["num_experts"]
        predicted = gguf_size(shapes, outtype, qtype, experts)
        assert 0 <= actual - predicted <= 1024, (path.name, actual, predicted)
    reference = next(layout.kld_work_dir.glob("reference-*.kld"))
    vocab = next(t.shape[0] for t in base.tensors if t.name.endswith("embed_tokens.weight"))
    assert existing_bytes(reference) == kld_reference_bytes(vocab, recipe.kld.chunks, recipe.kld.ctx_size)


@pytest.mark.llamacpp
def test_predicted_sizes_equal_llama_quantize_for_q2_k_and_q4_k_m(llama_build_shared, tmp_path):
    """The demo model (rows of 64 and 256: its 64-wide expert ffn_down_exps cannot take a 256-block
    type) converted with the pinned tools, then quantized to Q2_K and Q4_K_M (and Q3_K_M): each
    file's tensor data, predicted from the safetensors shapes alone, against the file, to within the
    one tensor the converter adds (rope_freqs, <= 1 KiB); and the fallbacks the plan predicts are
    the types llama-quantize wrote."""
    import gguf

    from moeprune.llamacpp.convert import convert_to_gguf
    from moeprune.llamacpp.quantize import quantize_gguf
    from moeprune.plan.gather import gguf_size
    from moeprune.plan.shapes import gguf_tensors, model_facts, read_shapes

    model = ROOT / "src" / "moeprune" / "demo" / "model"
    shapes = read_shapes(model)
    experts = model_facts(shapes.config).num_experts
    converted = tmp_path / "demo-F32.gguf"
    convert_to_gguf(llama_build_shared, model, converted, "f32", log_path=tmp_path / "convert.log")
    planned_names = {t.name for t in gguf_tensors(shapes, "f32")}
    for qtype in ("Q2_K", "Q4_K_M", "Q3_K_M"):
        out = tmp_path / f"demo-{qtype}.gguf"
        quantize_gguf(llama_build_shared, converted, out, qtype, log_path=tmp_path / f"quantize-{qtype}.log")
        tensors = gguf.GGUFReader(out).tensors
        actual = sum(int(t.n_bytes) for t in tensors)
        predicted = gguf_size(shapes, "f32", qtype, experts)
        print(f"{qtype}: predicted {predicted} bytes, llama-quantize wrote {actual}")
        assert 0 <= actual - predicted <= 1024, (qtype, actual, predicted)
        written = {t.name: t.tensor_type.name for t in tensors if t.name in planned_names}
        down = [name for name in written if name.endswith("ffn_down_exps.weight")]
        assert down and all(written[name] in ("Q4_0", "Q5_0", "Q8_0") for name in down), written


# --- reproduce on a filesystem too small -------------------------------------------------------
@pytest.fixture
def small_tmpfs(tmp_path):
    """A 20 MB tmpfs (the demo run writes about 80 MB); skipped only where mounting is refused."""
    mount_point = tmp_path / f"tmpfs-{uuid.uuid4().hex[:8]}"
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}); test_first_shortfall covers the decision")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=False)


def _files_under(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())


def test_reproduce_refuses_a_run_its_filesystem_cannot_hold(small_tmpfs):
    result = _invoke(["reproduce", "--no-live"], {"MOEPRUNE_RUNS_DIR": str(small_tmpfs)})
    assert result.returncode != 0
    error = result.stderr.strip().splitlines()[-1]
    assert re.search(r"refused before any stage ran: disk plan: stage 'convert-base' would not fit: "
                     r".* \((\d+) bytes = [\d.]+ GB short\); free space, or pass --ignore-disk-plan", error), error
    assert "Traceback" not in result.stderr
    assert "run plan (18 of 18 stages will run)" in result.stderr
    # Nothing was written (not even the digest cache) and the run's writer lock was released.
    assert _files_under(small_tmpfs) == []
    again = _invoke(["reproduce", "--no-live"], {"MOEPRUNE_RUNS_DIR": str(small_tmpfs)})
    assert "would not fit" in again.stderr and "in use" not in again.stderr


def test_kld_work_dir_is_planned_on_its_own_filesystem(small_tmpfs, tmp_path):
    """kld.work_dir on a filesystem of its own (the 20 MB tmpfs) while the run directory has room:
    the KLD reference and rivals are counted against the tmpfs only. At 16 chunks they fit
    there and check names both filesystems; at 256 chunks the reference file alone does not,
    and reproduce refuses, naming the kld stage and the tmpfs, before any stage runs (the run's own
    filesystem would hold it)."""
    from fakerun import demo_recipe_text

    text = demo_recipe_text()
    assert text.count("chunks = 16\n") == 1
    runs, recipe = tmp_path / "runs", tmp_path / "demo.toml"

    def run(command: str, chunks: str) -> subprocess.CompletedProcess:
        recipe.write_text(text.replace("chunks = 16\n", f'{chunks}\nwork_dir = "{small_tmpfs}"\n'))
        return _invoke([command, *(["--no-live"] if command == "reproduce" else []), "--recipe", str(recipe)],
                       {"MOEPRUNE_RUNS_DIR": str(runs)})

    fits = run("check", "chunks = 16")
    assert fits.returncode == 0, fits.stderr[-2000:]
    places = next(line for line in fits.stdout.splitlines() if line.startswith("  disk plan: fits ("))
    assert str(small_tmpfs) in places and str(tmp_path) in places.replace(str(small_tmpfs), ""), places

    refused = run("reproduce", "chunks = 256")
    assert refused.returncode != 0
    error = refused.stderr.strip().splitlines()[-1]
    assert re.search(rf"refused before any stage ran: disk plan: stage 'kld' would not fit: {small_tmpfs} has "
                     r"[\d.]+ MB free", error), error
    kld_line = next(line for line in refused.stderr.splitlines() if line.startswith("  kld "))
    reference_mb = float(re.search(r"reference log-probabilities ([\d.]+) MB", kld_line).group(1))
    assert reference_mb * 1e6 > 20 * 2**20, kld_line  # the reference alone is more than the tmpfs holds
    assert _files_under(small_tmpfs) == [] and not (runs / "demo" / "profile").exists()


@pytest.mark.slow
def test_ignore_disk_plan_runs_anyway(small_tmpfs):
    """--ignore-disk-plan: the profile runs; the prune then meets the full disk and fails in one
    line, leaving no half-written checkpoint."""
    result = _invoke(["reproduce", "--no-live", "--until", "convert-base", "--ignore-disk-plan"],
                     {"MOEPRUNE_RUNS_DIR": str(small_tmpfs)}, in_process=False)
    assert result.returncode != 0
    assert "would not fit" in result.stderr  # still printed, not refused
    assert "refused before any stage ran" not in result.stderr
    run = small_tmpfs / "demo"
    assert (run / "profile" / "profile.json").is_file()  # the profile stage ran
    output = result.stdout + result.stderr
    assert re.search(r"^\[convert-base\] failed", output, re.M), output[-3000:]
    assert not any(".tmp-" in name for name in _files_under(run))


# --- the no-op path ------------------------------------------------------------------------------
@pytest.mark.slow
def test_noop_reproduce_imports_neither_torch_nor_transformers(demo_run, tmp_path):
    runs = tmp_path / "runs"
    shutil.copytree(demo_run, runs / "demo")
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "invoke", "reproduce", "--no-live"],
                            cwd=ROOT, env={**os.environ, "MOEPRUNE_RUNS_DIR": str(runs)},
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    statuses = dict(re.findall(r"^\[(\S+)\] (\w+)", result.stdout + result.stderr, re.M))
    assert sorted(statuses) == sorted(stage.name for stage in build_pipeline().stages), statuses
    assert set(statuses.values()) == {"skipped"}, statuses
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    heavy = sorted(m for m in imported if m.split(".")[0] in ("torch", "transformers"))
    assert heavy == [], heavy[:5]
    assert "run plan" not in result.stderr  # computed only for stages that will run
