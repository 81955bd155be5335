"""Expert pruning: streaming surgery, exact sharding, verification and equivalence.

The equivalence test is the proof the card's method rests on: a model pruned to the kept experts
computes the same logits as the base model whose router can never pick a dropped expert.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from invoke_cli import invoke, invoke_ok
from tiny_gemma4 import NUM_EXPERTS, NUM_LAYERS, tiny_gemma4_model

from moeprune.errors import MoepruneError
from moeprune.io.checkpoint import INDEX_NAME, Checkpoint
from moeprune.io.writer import ShardedWriter
from moeprune.prune import prune_checkpoint, verify_prune
from moeprune.prune.surgery import DROP_MAP_NAME
from moeprune.demo import MODEL_DIR as DEMO_MODEL

ROOT = Path(__file__).resolve().parents[1]

KEEP_COUNT = 11
TINY_SHARD_BYTES = 300_000
# float32 tolerance for logits (softcapped to +-30 in the demo model): about 1000 ulps of 1.0.
LOGITS_RTOL = 1e-4
LOGITS_ATOL = 1e-4

CALIBRATION_FALLBACK = [
    "Solve step by step: a train travels 120 km in 1.5 hours. What is its average speed?",
    "If all bloops are razzies and all razzies are lazzies, are all bloops lazzies? Explain.",
    "Write a Python function that returns the n-th Fibonacci number iteratively.",
    "Why does ice float on water? Answer in terms of density and hydrogen bonds.",
    "Write a four-line poem about a lighthouse keeper who collects lost letters.",
]
HELD_OUT_FALLBACK = [
    "Question: Which planet is known as the Red Planet? A. Venus B. Mars C. Jupiter D. Saturn Answer:",
    "The committee postponed the vote until every member had read the amended proposal.",
    "Question: What is 7 times 8? A. 54 B. 56 C. 58 D. 64 Answer:",
]


# --- fixtures and helpers -------------------------------------------------------------------------


def build_tiny_model(directory: Path, dtype: torch.dtype = torch.float32, max_shard_size: str | None = "200KB") -> Path:
    """A random tiny Gemma 4 MoE whose routing is decisive and whose expert scales all differ."""
    model = tiny_gemma4_model(vocab_size=512)
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            layer.router.proj.weight.normal_(0.0, 1.0)  # sharp routing: dropping experts changes outputs
            layer.router.per_expert_scale.uniform_(0.5, 1.5)  # a mis-sliced scale would show
            layer.experts.gate_up_proj.normal_(0.0, 0.2)
            layer.experts.down_proj.normal_(0.0, 0.2)
    model = model.to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, **kwargs)
    (directory / "chat_template.jinja").write_text("{{ messages }}\n")
    (directory / "tokenizer_config.json").write_text('{"model_max_length": 128}\n')
    return directory


def make_drop_map(path: Path, num_experts: int = NUM_EXPERTS, layers: list[int] | None = None,
                  keep_count: int | list[int] = KEEP_COUNT, seed: int = 0, top_k: int = 2) -> dict:
    """A schema-valid drop map with random keep sets (uniform when keep_count is an int)."""
    layers = list(range(NUM_LAYERS)) if layers is None else layers
    counts = [keep_count] * len(layers) if isinstance(keep_count, int) else keep_count
    rng = random.Random(seed)
    entries = []
    for layer, count in zip(layers, counts, strict=True):
        keep = sorted(rng.sample(range(num_experts), count))
        entries.append({"layer": layer, "keep": keep, "drop": [e for e in range(num_experts) if e not in keep],
                        "retained_fraction": 0.99})
    uniform = len(set(counts)) == 1
    drop_map = {
        "format_version": 1,
        "base_model": {"id": "tiny-test-model", "revision": None, "sha256": None},
        "num_experts": num_experts,
        "top_k": top_k,
        "num_experts_kept": counts[0] if uniform else None,
        "strategy": {"name": "uniform-count" if uniform else "per-layer-retention", "criterion": "contribution-sum",
                     "retention_threshold": None if uniform else 0.9, "keep_count": counts[0] if uniform else None,
                     "protect_top_k": 0, "seed": seed},
        "layers": entries,
        "hashes": {"profile_stats_sha256": "0" * 64, "recipe_sha256": None},
        "uniform": uniform,
    }
    path.write_text(json.dumps(drop_map, indent=2))
    return drop_map


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "base")


@pytest.fixture(scope="module")
def pruned_tiny(tiny_model, tmp_path_factory) -> tuple[Path, Path, dict, dict]:
    """(pruned dir, drop map path, drop map, prune record) for the tiny model."""
    work = tmp_path_factory.mktemp("pruned")
    drop_map_path = work / "drop.json"
    drop_map = make_drop_map(drop_map_path)
    record = prune_checkpoint(tiny_model, drop_map_path, work / "pruned", TINY_SHARD_BYTES)
    return work / "pruned", drop_map_path, drop_map, record


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def assert_nothing_left(out_dir: Path) -> None:
    """No output directory and no temporary sibling of it."""
    assert not out_dir.exists()
    leftovers = [p.name for p in out_dir.parent.iterdir() if p.name.startswith(f".{out_dir.name}.")]
    assert leftovers == []


def shard_paths(model_dir: Path) -> list[Path]:
    index = json.loads((model_dir / INDEX_NAME).read_text())
    return [model_dir / name for name in sorted(set(index["weight_map"].values()))]


def text_token_ids(texts: list[str], vocab_size: int, tokenizer=None) -> list[torch.Tensor]:
    if tokenizer is not None:
        return [tokenizer(text, return_tensors="pt").input_ids for text in texts]
    # The tiny model has no tokenizer: bytes of the text stand in for token ids.
    return [torch.tensor([[2] + [b % vocab_size for b in text.encode()]]) for text in texts]


def calibration_texts() -> list[str]:
    files = sorted((ROOT / "calibration").glob("*.jsonl"))
    if files:
        lines = [json.loads(line) for line in files[0].read_text().splitlines() if line.strip()]
        return [item["prompt"] for item in lines[:6]]
    return CALIBRATION_FALLBACK


def held_out_texts() -> list[str]:
    files = sorted((ROOT / "src/moeprune/demo/tasks/demo_mcq").glob("*.jsonl"))
    if files:
        lines = [json.loads(line) for line in files[0].read_text().splitlines() if line.strip()]
        return [json.dumps(item, ensure_ascii=False)[:400] for item in lines[:4]]
    return HELD_OUT_FALLBACK


def masked_router_hooks(model, drop_map: dict) -> list:
    """Forward hooks adding -inf to the dropped experts' router logits (base model)."""
    handles = []
    layers = model.model.language_model.layers
    for entry in drop_map["layers"]:
        router_proj = layers[entry["layer"]].router.proj
        mask = torch.zeros(router_proj.out_features)
        mask[entry["drop"]] = float("-inf")

        def hook(module, inputs, output, mask=mask):
            return output + mask.to(output.dtype)

        handles.append(router_proj.register_forward_hook(hook))
    return handles


def assert_logits_equivalent(base_dir: Path, pruned_dir: Path, drop_map: dict, tokenizer=None) -> None:
    import transformers

    torch.set_num_threads(1)
    base = transformers.Gemma4ForConditionalGeneration.from_pretrained(base_dir, dtype=torch.float32).eval()
    pruned = transformers.Gemma4ForConditionalGeneration.from_pretrained(pruned_dir, dtype=torch.float32).eval()
    assert pruned.config.text_config.num_experts == drop_map["num_experts_kept"]
    vocab_size = base.config.text_config.vocab_size
    texts = calibration_texts() + held_out_texts()
    largest_unmasked_difference = 0.0
    with torch.no_grad():
        for ids in text_token_ids(texts, vocab_size, tokenizer):
            pruned_logits = pruned(input_ids=ids).logits
            unmasked_logits = base(input_ids=ids).logits
            handles = masked_router_hooks(base, drop_map)
            try:
                masked_logits = base(input_ids=ids).logits
            finally:
                for handle in handles:
                    handle.remove()
            # float32 rounding only: the masked softmax renormalises over different denominators.
            torch.testing.assert_close(pruned_logits, masked_logits, rtol=LOGITS_RTOL, atol=LOGITS_ATOL)
            largest_unmasked_difference = max(
                largest_unmasked_difference, (pruned_logits - unmasked_logits).abs().max().item()
            )
    # The comparison has teeth: without the mask, the dropped experts change the logits far beyond
    # the tolerance.
    assert largest_unmasked_difference > 100 * LOGITS_ATOL


# --- equivalence and loading ------------------------------------------------------------------------


def test_pruned_logits_equal_base_with_dropped_experts_masked(tiny_model, pruned_tiny):
    pruned_dir, _, drop_map, _ = pruned_tiny
    assert_logits_equivalent(tiny_model, pruned_dir, drop_map)


@pytest.mark.slow
def test_demo_model_pruned_logits_equal_masked_base(tmp_path):
    from transformers import AutoTokenizer

    config = json.loads((DEMO_MODEL / "config.json").read_text())
    text = config.get("text_config") or config
    layers = [i for i in range(text["num_hidden_layers"])]
    keep = max(text["top_k_experts"], text["num_experts"] * 3 // 4)
    make_drop_map(tmp_path / "drop.json", num_experts=text["num_experts"], layers=layers, keep_count=keep,
                  top_k=text["top_k_experts"])
    prune_checkpoint(DEMO_MODEL, tmp_path / "drop.json", tmp_path / "pruned", 4_000_000)
    assert verify_prune(DEMO_MODEL, tmp_path / "pruned").ok
    drop_map = json.loads((tmp_path / "drop.json").read_text())
    assert_logits_equivalent(DEMO_MODEL, tmp_path / "pruned", drop_map, AutoTokenizer.from_pretrained(DEMO_MODEL))


def test_pruned_directory_has_config_companions_and_drop_map(tiny_model, pruned_tiny):
    pruned_dir, drop_map_path, _, record = pruned_tiny
    config = json.loads((pruned_dir / "config.json").read_text())
    base_config = json.loads((tiny_model / "config.json").read_text())
    assert config["text_config"]["num_experts"] == KEEP_COUNT
    config["text_config"]["num_experts"] = NUM_EXPERTS
    assert config == base_config
    for name in ("chat_template.jinja", "tokenizer_config.json", "generation_config.json"):
        assert (pruned_dir / name).read_bytes() == (tiny_model / name).read_bytes()
    assert (pruned_dir / DROP_MAP_NAME).read_bytes() == drop_map_path.read_bytes()
    assert record["num_experts_kept"] == KEEP_COUNT and record["tensors_sliced"] == 4 * NUM_LAYERS


# --- sharding -------------------------------------------------------------------------------------


def expected_shard_count(tensor_nbytes: list[int], max_shard_bytes: int) -> int:
    """The greedy rule: start a new shard when the next tensor would pass the limit."""
    shards, current = 0, None
    for nbytes in tensor_nbytes:
        if current is None or current + nbytes > max_shard_bytes:
            shards, current = shards + 1, 0
        current += nbytes
    return shards


def test_index_is_exact_and_shard_count_as_expected(tiny_model, pruned_tiny):
    pruned_dir, _, _, record = pruned_tiny
    index = json.loads((pruned_dir / INDEX_NAME).read_text())
    stored: dict[str, str] = {}
    total = 0
    shard_files = sorted(pruned_dir.glob("model-*.safetensors"))
    count = len(shard_files)
    assert [p.name for p in shard_files] == [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
    for shard in shard_files:
        shard_nbytes = 0
        with safe_open(shard, framework="pt") as handle:
            for name in handle.keys():
                stored[name] = shard.name
                tensor = handle.get_tensor(name)
                shard_nbytes += tensor.numel() * tensor.element_size()
        total += shard_nbytes
        assert shard_nbytes <= TINY_SHARD_BYTES or len(list(safe_open(shard, "pt").keys())) == 1
    assert index["weight_map"] == stored
    assert index["metadata"]["total_size"] == total == record["total_size"]
    sizes = []
    with Checkpoint.open(tiny_model) as base:
        for info in base.tensors():
            rows = KEEP_COUNT if ".experts." in info.name or ".router.p" in info.name else None
            sizes.append(info.nbytes // info.shape[0] * rows if rows else info.nbytes)
    assert count == expected_shard_count(sizes, TINY_SHARD_BYTES) > 1


def test_writer_flushes_before_limit_and_gives_big_tensors_their_own_shard(tmp_path):
    out = tmp_path / "out"
    with ShardedWriter(out, max_shard_bytes=100) as writer:
        for i, nbytes in enumerate([40, 40, 40, 250, 8, 100]):
            writer.add_bytes(f"t{i}", "U8", [nbytes], bytes([i]) * nbytes)
    index = json.loads((out / INDEX_NAME).read_text())
    assert index["metadata"]["total_size"] == 478
    shard = "model-{:05d}-of-00005.safetensors".format
    assert index["weight_map"] == {"t0": shard(1), "t1": shard(1), "t2": shard(2), "t3": shard(3),
                                   "t4": shard(4), "t5": shard(5)}
    with safe_open(out / index["weight_map"]["t3"], framework="numpy") as handle:
        assert handle.get_tensor("t3").tobytes() == bytes([3]) * 250


def test_writer_leaves_nothing_when_the_block_raises(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError), ShardedWriter(out, max_shard_bytes=10) as writer:
        writer.add_bytes("a", "U8", [20], b"x" * 20)
        writer.add_bytes("b", "U8", [20], b"y" * 20)  # flushes shard 1 to disk
        raise RuntimeError("boom")
    assert_nothing_left(out)


# --- byte-for-byte copies in any dtype, towers, verification ----------------------------------------


def test_bf16_single_file_checkpoint_is_sliced_byte_for_byte(tmp_path):
    base = build_tiny_model(tmp_path / "base", dtype=torch.bfloat16, max_shard_size=None)
    assert (base / "model.safetensors").is_file() and not (base / INDEX_NAME).exists()
    drop_map = make_drop_map(tmp_path / "drop.json", seed=3)
    prune_checkpoint(base, tmp_path / "drop.json", tmp_path / "pruned", 10**9)
    pruned_shards = shard_paths(tmp_path / "pruned")
    assert len(pruned_shards) == 1
    keep = {entry["layer"]: entry["keep"] for entry in drop_map["layers"]}
    with safe_open(base / "model.safetensors", "pt") as b, safe_open(pruned_shards[0], "pt") as p:
        assert set(b.keys()) == set(p.keys())
        assert b.get_tensor("model.language_model.layers.0.experts.gate_up_proj").dtype == torch.bfloat16
        for name in b.keys():
            before, after = b.get_tensor(name), p.get_tensor(name)
            assert after.dtype == before.dtype
            if name.endswith(("experts.gate_up_proj", "experts.down_proj", "router.proj.weight", "per_expert_scale")):
                layer = int(name.split(".layers.")[1].split(".")[0])
                before = before[keep[layer]]
            assert torch.equal(before.view(torch.int16) if before.dtype == torch.bfloat16 else before,
                               after.view(torch.int16) if after.dtype == torch.bfloat16 else after), name


def test_verify_prune_passes_on_a_correct_prune(tiny_model, pruned_tiny):
    report = verify_prune(tiny_model, pruned_tiny[0])
    assert report.ok, report.render()
    assert report.expert_slices_checked == 2 * NUM_LAYERS * KEEP_COUNT
    assert report.router_rows_checked == report.router_scales_checked == NUM_LAYERS * KEEP_COUNT
    assert report.identical_tensors == report.tensors_checked - 4 * NUM_LAYERS
    assert "OK" in report.render()


def _flip_byte_in_tensor(model_dir: Path, name: str, byte_offset: int) -> None:
    with Checkpoint.open(model_dir) as checkpoint:
        info = checkpoint[name]
    with open(info.shard, "r+b") as handle:
        handle.seek(info.data_offset + byte_offset)
        value = handle.read(1)
        handle.seek(info.data_offset + byte_offset)
        handle.write(bytes([value[0] ^ 0x01]))


def test_verify_prune_names_a_changed_expert_slice_and_config(tiny_model, pruned_tiny, tmp_path):
    pruned = copy_model(pruned_tiny[0], tmp_path / "tampered")
    name = "model.language_model.layers.2.experts.down_proj"
    with Checkpoint.open(pruned) as checkpoint:
        row_nbytes = checkpoint[name].row_nbytes()
    _flip_byte_in_tensor(pruned, name, 3 * row_nbytes + 5)  # inside the 4th kept expert
    config = json.loads((pruned / "config.json").read_text())
    config["text_config"]["top_k_experts"] = 3
    (pruned / "config.json").write_text(json.dumps(config))
    report = verify_prune(tiny_model, pruned)
    assert not report.ok
    kept_expert = pruned_tiny[2]["layers"][2]["keep"][3]
    text = report.render()
    assert f"'{name}': kept expert(s) [{kept_expert}]" in text
    assert "text_config.top_k_experts" in text


def test_vision_tower_passes_through_and_unknown_expert_tensors_are_refused(tmp_path):
    base = tmp_path / "synthetic"
    experts, hidden = 4, 8
    tensors = {
        "model.vision_tower.encoder.layers.0.mlp.fc1.weight": (b"\x07" * 64, "F32", [4, 4]),
        "model.language_model.layers.0.experts.gate_up_proj": (bytes(range(experts * 16)), "U8", [experts, 4, 4]),
        "model.language_model.layers.0.experts.down_proj": (bytes(range(experts * 8)), "U8", [experts, 8]),
        "model.language_model.layers.0.router.proj.weight": (bytes(range(experts * hidden)), "U8", [experts, hidden]),
        "model.language_model.layers.0.router.per_expert_scale": (bytes(range(experts)), "U8", [experts]),
    }
    with ShardedWriter(base, max_shard_bytes=10**6) as writer:
        for name, (data, dtype, shape) in tensors.items():
            writer.add_bytes(name, dtype, shape, data)
        (writer.staging_dir / "config.json").write_text(json.dumps({"text_config": {"num_experts": experts}}))
    make_drop_map(tmp_path / "drop.json", num_experts=experts, layers=[0], keep_count=2, seed=1, top_k=1)
    prune_checkpoint(base, tmp_path / "drop.json", tmp_path / "pruned", 10**6)
    assert verify_prune(base, tmp_path / "pruned").ok
    with Checkpoint.open(tmp_path / "pruned") as pruned:
        vision = pruned["model.vision_tower.encoder.layers.0.mlp.fc1.weight"]
        assert pruned.read(vision) == b"\x07" * 64

    # A quantized (or per-expert split) expert tensor must never be copied unsliced.
    odd = tmp_path / "odd"
    with ShardedWriter(odd, max_shard_bytes=10**6) as writer:
        for name, (data, dtype, shape) in tensors.items():
            writer.add_bytes(name, dtype, shape, data)
        writer.add_bytes("model.language_model.layers.0.experts.down_proj_scale", "U8", [experts], bytes(experts))
        (writer.staging_dir / "config.json").write_text(json.dumps({"text_config": {"num_experts": experts}}))
    odd_name = "model.language_model.layers.0.experts.down_proj_scale"
    with pytest.raises(MoepruneError, match=f"unsupported expert tensor '{odd_name}'"):
        prune_checkpoint(odd, tmp_path / "drop.json", tmp_path / "odd_pruned", 10**6)
    assert_nothing_left(tmp_path / "odd_pruned")


# --- failures end with a clear error and no output ---------------------------------------------------


@pytest.fixture()
def work_copy(tiny_model, tmp_path) -> tuple[Path, Path]:
    """A private copy of the tiny model and a uniform drop map for it."""
    base = copy_model(tiny_model, tmp_path / "base")
    make_drop_map(tmp_path / "drop.json")
    return base, tmp_path / "drop.json"


def test_truncated_shard_is_refused_naming_the_file(work_copy, tmp_path):
    base, drop_map = work_copy
    shard = shard_paths(base)[2]
    with open(shard, "r+b") as handle:
        handle.truncate(shard.stat().st_size - 100)
    with pytest.raises(MoepruneError, match=f"{shard}: .*truncated"):
        prune_checkpoint(base, drop_map, tmp_path / "out", TINY_SHARD_BYTES)
    assert_nothing_left(tmp_path / "out")


def test_corrupt_shard_header_is_refused_naming_the_file(work_copy, tmp_path):
    base, drop_map = work_copy
    shard = shard_paths(base)[1]
    data = bytearray(shard.read_bytes())
    header_nbytes = struct.unpack("<Q", data[:8])[0]
    data[8 : 8 + 16] = b"#not json at all"  # the JSON header is garbage now
    assert header_nbytes > 16
    shard.write_bytes(bytes(data))
    with pytest.raises(MoepruneError, match=f"{shard}: corrupt safetensors header"):
        prune_checkpoint(base, drop_map, tmp_path / "out", TINY_SHARD_BYTES)
    assert_nothing_left(tmp_path / "out")

    data[:8] = struct.pack("<Q", 10**15)  # an absurd header length
    shard.write_bytes(bytes(data))
    with pytest.raises(MoepruneError, match=f"{shard}: corrupt safetensors header"):
        prune_checkpoint(base, drop_map, tmp_path / "out", TINY_SHARD_BYTES)
    assert_nothing_left(tmp_path / "out")


def test_index_naming_a_missing_shard_is_refused(work_copy, tmp_path):
    base, drop_map = work_copy
    missing = shard_paths(base)[-1]
    missing.unlink()
    with pytest.raises(MoepruneError, match=f"{INDEX_NAME}: names shard.*{missing.name}"):
        prune_checkpoint(base, drop_map, tmp_path / "out", TINY_SHARD_BYTES)
    assert_nothing_left(tmp_path / "out")


def test_drop_map_for_another_expert_count_is_refused(work_copy, tmp_path):
    base, _ = work_copy
    make_drop_map(tmp_path / "other.json", num_experts=NUM_EXPERTS * 2, keep_count=20)
    with pytest.raises(MoepruneError, match=f"drop map is for {NUM_EXPERTS * 2} experts per layer but the checkpoint"):
        prune_checkpoint(base, tmp_path / "other.json", tmp_path / "out", TINY_SHARD_BYTES)
    assert_nothing_left(tmp_path / "out")


def test_drop_map_for_another_layer_count_is_refused(work_copy, tmp_path):
    base, _ = work_copy
    make_drop_map(tmp_path / "other.json", layers=[0, 1, 2])
    with pytest.raises(MoepruneError, match=r"covers MoE layers \[0, 1, 2\] but the checkpoint .* \[0, 1, 2, 3\]"):
        prune_checkpoint(base, tmp_path / "other.json", tmp_path / "out", TINY_SHARD_BYTES)
    assert_nothing_left(tmp_path / "out")


def test_non_uniform_drop_map_is_refused(work_copy, tmp_path):
    base, _ = work_copy
    make_drop_map(tmp_path / "ragged.json", keep_count=[11, 12, 11, 13])
    with pytest.raises(MoepruneError, match="non-uniform drop map .*per-layer-retention.*build a uniform drop map"):
        prune_checkpoint(base, tmp_path / "ragged.json", tmp_path / "out", TINY_SHARD_BYTES)
    assert_nothing_left(tmp_path / "out")


@contextlib.contextmanager
def read_only_directory(path: Path):
    """Make ``path`` unwritable, also for root (immutable attribute), or skip the test."""
    if os.geteuid() != 0:
        path.chmod(0o555)
        try:
            yield
        finally:
            path.chmod(0o755)
        return
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode:
        pytest.skip("running as root without chattr +i: cannot make a read-only directory")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def test_read_only_output_location_fails_cleanly(work_copy, tmp_path):
    base, drop_map = work_copy
    parent = tmp_path / "readonly"
    parent.mkdir()
    with read_only_directory(parent):
        with pytest.raises(MoepruneError, match=f"cannot create output directory next to {parent / 'out'}"):
            prune_checkpoint(base, drop_map, parent / "out", TINY_SHARD_BYTES)
        assert list(parent.iterdir()) == []


def test_write_failing_midway_via_the_cli_leaves_no_output(work_copy, tmp_path):
    """A real `invoke prune` whose writes hit a file-size limit (as on a full disk)."""
    base, drop_map = work_copy
    out = tmp_path / "out"

    def limit_file_size() -> None:
        import resource
        import signal

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG errors instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (150_000, 150_000))

    result = invoke("prune", "--base", str(base), "--drop-map", str(drop_map), "--out", str(out),
                    "--max-shard-bytes", str(TINY_SHARD_BYTES), preexec_fn=limit_file_size)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"error: writing {out} failed: File too large" in result.stderr
    assert "Traceback" not in result.stderr
    assert_nothing_left(out)


def test_cli_prune_and_verify_succeed(pruned_tiny, tiny_model, tmp_path):
    _, drop_map_path, _, _ = pruned_tiny
    out = tmp_path / "cli_out"
    pruned = invoke_ok("prune", "--base", str(tiny_model), "--drop-map", str(drop_map_path), "--out", str(out),
                       "--max-shard-bytes", "10000000", in_process=True)
    assert f"{NUM_EXPERTS} -> {KEEP_COUNT} experts in {NUM_LAYERS} MoE layers, 1 shard(s)" in pruned.stdout
    verified = invoke_ok("verify-prune", "--base", str(tiny_model), "--pruned", str(out), in_process=True)
    assert "result: OK" in verified.stdout


# --- llama.cpp converter ------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.llamacpp
def test_pruned_demo_model_goes_through_llama_cpp_converter(tmp_path):
    from moeprune.llamacpp.source import ensure_source
    from moeprune.recipe import LlamaCppSection

    llama_cpp = ensure_source(LlamaCppSection()).root  # the pinned tree, unpacked (and verified) if needed
    config = json.loads((DEMO_MODEL / "config.json").read_text())
    text = config.get("text_config") or config
    keep = max(text["top_k_experts"], text["num_experts"] * 3 // 4)
    make_drop_map(tmp_path / "drop.json", num_experts=text["num_experts"],
                  layers=list(range(text["num_hidden_layers"])), keep_count=keep, top_k=text["top_k_experts"])
    prune_checkpoint(DEMO_MODEL, tmp_path / "drop.json", tmp_path / "pruned", 4_000_000)
    gguf_path = tmp_path / "pruned-f32.gguf"
    env = dict(os.environ, PYTHONPATH=str(llama_cpp / "gguf-py"))
    result = subprocess.run(
        [sys.executable, str(llama_cpp / "convert_hf_to_gguf.py"), str(tmp_path / "pruned"),
         "--outfile", str(gguf_path), "--outtype", "f32"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    sys.path.insert(0, str(llama_cpp / "gguf-py"))
    from gguf import GGUFReader

    reader = GGUFReader(gguf_path)
    field = reader.fields["gemma4.expert_count"]
    assert int(field.parts[field.data[0]][0]) == keep


def test_read_write_fallback_copies_the_same_bytes(tiny_model, tmp_path, monkeypatch):
    """Where the kernel cannot copy between files, the chunked read/write path is used instead."""
    import moeprune.io.checkpoint as checkpoint_module

    monkeypatch.setattr(checkpoint_module, "_kernel_copy_works", False)
    make_drop_map(tmp_path / "drop.json", seed=5)
    prune_checkpoint(tiny_model, tmp_path / "drop.json", tmp_path / "pruned", TINY_SHARD_BYTES)
    assert verify_prune(tiny_model, tmp_path / "pruned").ok
