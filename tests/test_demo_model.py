"""The embedded demo model: its layout, tokenizer, chat template, build record and lm-eval task."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
import yaml
from safetensors import safe_open

from moeprune.demo import HELDOUT_PATH, MODEL_DIR, data
from moeprune.demo import tasks as demo_tasks
from moeprune.demo.build import extract_answers, split_reply
from moeprune.hashing import sha256_file

MAX_MODEL_BYTES = 25_000_000

# Key patterns of google/gemma-4-26B-A4B-it's text tower (shapes checked separately).
LAYER = r"model\.language_model\.layers\.\d+\."
REAL_KEY_PATTERNS = [
    r"model\.language_model\.embed_tokens\.weight",
    r"model\.language_model\.norm\.weight",
    LAYER + r"(input_layernorm|post_attention_layernorm|pre_feedforward_layernorm|post_feedforward_layernorm"
    r"|post_feedforward_layernorm_1|post_feedforward_layernorm_2|pre_feedforward_layernorm_2)\.weight",
    LAYER + r"self_attn\.(q_proj|k_proj|v_proj|o_proj)\.weight",
    LAYER + r"self_attn\.(q_norm|k_norm)\.weight",
    LAYER + r"mlp\.(gate_proj|up_proj|down_proj)\.weight",
    LAYER + r"experts\.(gate_up_proj|down_proj)",
    LAYER + r"router\.(proj\.weight|per_expert_scale|scale)",
    LAYER + r"layer_scalar",
]


def _index() -> dict:
    return json.loads((MODEL_DIR / "model.safetensors.index.json").read_text())


def _config() -> dict:
    return json.loads((MODEL_DIR / "config.json").read_text())


def _record() -> dict:
    return json.loads((MODEL_DIR / "build_record.json").read_text())


@pytest.fixture(scope="module")
def hf_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(MODEL_DIR)


def test_config_is_text_only_gemma4_moe_with_hybrid_attention():
    cfg = _config()
    text = cfg["text_config"]
    assert cfg["architectures"] == ["Gemma4ForConditionalGeneration"]
    assert cfg["vision_config"] is None and cfg["audio_config"] is None
    assert text["enable_moe_block"] is True
    assert text["num_hidden_layers"] >= 4
    assert text["num_experts"] >= 16
    assert text["top_k_experts"] >= 2
    assert {"sliding_attention", "full_attention"} == set(text["layer_types"])
    assert text["layer_types"][-1] == "full_attention"


def test_loads_as_gemma4_for_conditional_generation():
    import torch
    from transformers import Gemma4ForConditionalGeneration

    model = Gemma4ForConditionalGeneration.from_pretrained(MODEL_DIR, dtype=torch.float32)
    assert type(model).__name__ == "Gemma4ForConditionalGeneration"
    assert model.model.vision_tower is None if hasattr(model.model, "vision_tower") else True
    saved_keys = set(_index()["weight_map"])
    assert saved_keys == set(model.state_dict()) - {"lm_head.weight"}  # lm_head is tied


def test_tensor_names_and_shapes_follow_the_real_checkpoint():
    text = _config()["text_config"]
    experts, hidden, inter = text["num_experts"], text["hidden_size"], text["moe_intermediate_size"]
    weight_map = _index()["weight_map"]
    unmatched = [k for k in weight_map if not any(re.fullmatch(p, k) for p in REAL_KEY_PATTERNS)]
    assert unmatched == []
    shapes = {}
    for shard in sorted(set(weight_map.values())):
        with safe_open(MODEL_DIR / shard, "pt") as handle:
            for key in handle.keys():
                shapes[key] = list(handle.get_slice(key).get_shape())
    for layer in range(text["num_hidden_layers"]):
        prefix = f"model.language_model.layers.{layer}."
        assert shapes[prefix + "experts.gate_up_proj"] == [experts, 2 * inter, hidden]
        assert shapes[prefix + "experts.down_proj"] == [experts, hidden, inter]
        assert shapes[prefix + "router.proj.weight"] == [experts, hidden]
        assert shapes[prefix + "router.per_expert_scale"] == [experts]
        assert shapes[prefix + "mlp.down_proj.weight"] == [hidden, text["intermediate_size"]]


def test_at_least_two_shards_and_the_index_is_exact():
    index = _index()
    shards = sorted(p.name for p in MODEL_DIR.glob("model-*.safetensors"))
    assert len(shards) >= 2
    assert all(re.fullmatch(rf"model-\d{{5}}-of-{len(shards):05d}\.safetensors", s) for s in shards)
    assert sorted(set(index["weight_map"].values())) == shards
    total_bytes = 0
    for shard in shards:
        with safe_open(MODEL_DIR / shard, "pt") as handle:
            for key in handle.keys():
                assert index["weight_map"][key] == shard
                tensor = handle.get_tensor(key)
                total_bytes += tensor.numel() * tensor.element_size()
    assert index["metadata"]["total_size"] == total_bytes


def test_model_directory_is_under_25_mb():
    size_bytes = sum(p.stat().st_size for p in MODEL_DIR.iterdir() if p.is_file())
    assert size_bytes < MAX_MODEL_BYTES


def test_build_record_shows_trained_model_answering_heldout_questions():
    record = _record()
    heldout_rows = HELDOUT_PATH.read_text().splitlines()
    assert record["trained"] is True and record["steps"] > 0
    assert record["heldout"]["num_questions"] == len(heldout_rows) >= 40
    assert record["heldout"]["greedy_generation_accuracy"] >= 0.60
    assert record["tokenizer_sha256"] == sha256_file(MODEL_DIR / "tokenizer.json")
    for key in ("seed", "data_sha256", "versions", "wall_s"):
        assert key in record
    assert {"torch", "transformers"} <= set(record["versions"])


def test_tokenizer_has_gemma4_special_tokens_at_gemma4_ids(hf_tokenizer):
    expected = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4, "<|tool_call>": 48,
                "<|think|>": 98, "<|channel>": 100, "<channel|>": 101, "<|turn>": 105, "<turn|>": 106}
    vocab = hf_tokenizer.get_vocab()
    assert {t: vocab[t] for t in expected} == expected
    assert set(expected) <= set(hf_tokenizer.all_special_tokens)
    assert vocab["<0x00>"] + 255 == vocab["<0xFF>"]


def test_tokenizer_json_is_bpe_with_byte_fallback_in_gemma_format():
    spec = json.loads((MODEL_DIR / "tokenizer.json").read_text())
    assert spec["model"]["type"] == "BPE" and spec["model"]["byte_fallback"] is True
    assert spec["decoder"]["type"] == "Sequence"
    assert spec["normalizer"]["type"] == "Replace" and spec["normalizer"]["content"] == "▁"
    merges = [m if isinstance(m, list) else m.split(" ") for m in spec["model"]["merges"]]
    assert not [m for m in merges if "\n" in m[0] + m[1]], "llama.cpp splits on newlines before BPE"


@pytest.mark.parametrize(
    "text", ["What is 7 times 8?", "def add(a, b):\n    return a + b", "naïve café ☕ 日本語", "  two  spaces\n\n"]
)
def test_tokenizer_round_trips(hf_tokenizer, text):
    ids = hf_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert hf_tokenizer.decode(ids) == text


def test_tokenizer_adds_bos_and_keeps_control_tokens_whole(hf_tokenizer):
    ids = hf_tokenizer("<|turn>user\nhi<turn|>")["input_ids"]
    assert ids[0] == 2
    assert ids[1] == 105 and ids[-1] == 106


def test_chat_template_renders_gemma4_turns_with_and_without_thinking(hf_tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    thinking = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                enable_thinking=True)
    assert thinking == "<bos><|turn>system\n<|think|>\nBe brief.<turn|>\n<|turn>user\nHello<turn|>\n<|turn>model\n"
    plain = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                             enable_thinking=False)
    assert "<|think|>" not in plain
    assert plain.endswith("<|turn>model\n<|channel>thought\n<channel|>")
    # llama.cpp picks its Gemma 4 chat parser by this marker in the template source.
    assert "'<|tool_call>call:'" in (MODEL_DIR / "chat_template.jinja").read_text()


def test_heldout_questions_are_never_trained_on():
    heldout = data.heldout_mcqs(48, seed=0)
    keys = {q.key for q in heldout}
    stream = data.training_mcqs(random.Random(1), keys)
    assert not [q for _, q in zip(range(5000), stream) if q.key in keys]


def test_every_question_has_exactly_one_choice_with_the_property():
    rng = random.Random(3)
    for _ in range(500):
        q = data.random_mcq(rng)
        assert len(set(q.choices)) == 4
        gold = q.choices[q.answer_index]
        others = [c for i, c in enumerate(q.choices) if i != q.answer_index]
        prop = {"even": lambda n: n % 2 == 0, "odd": lambda n: n % 2 == 1,
                "above": lambda n: n > 50, "below": lambda n: n < 50}[q.kind]
        assert prop(gold) and not any(prop(c) for c in others)


def test_model_reply_satisfies_both_gpqa_filters():
    q = data.heldout_mcqs(4, seed=0)[0]
    generated = f"<|channel>thought\n{q.thought()}<channel|>{q.reply()}<turn|>"
    thought, content = split_reply(generated)
    assert thought == q.thought()
    assert extract_answers(content) == (f"({q.answer_letter})", f"({q.answer_letter})")


def test_committed_task_yaml_is_the_generated_one():
    committed = (demo_tasks.TASK_DIR / demo_tasks.YAML_FILENAME).read_text()
    assert committed == demo_tasks.task_yaml(demo_tasks.REPO_RELATIVE_DATA)


def test_task_yaml_mirrors_gpqa_diamond_cot_zeroshot():
    import lm_eval

    gpqa_dir = Path(lm_eval.__file__).parent / "tasks" / "gpqa" / "cot_zeroshot"
    class _Loader(yaml.SafeLoader):  # gpqa's YAML uses lm-eval's !function tag
        pass

    _Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))
    gpqa = yaml.load((gpqa_dir / "_gpqa_cot_zeroshot_yaml").read_text(), Loader=_Loader)
    ours = yaml.safe_load(demo_tasks.task_yaml("/data.jsonl"))
    for key in ("doc_to_text", "doc_to_target", "filter_list", "output_type", "num_fewshot"):
        assert ours[key] == gpqa[key], key
    assert ours["generation_kwargs"]["until"] == gpqa["generation_kwargs"]["until"]
    assert ours["generation_kwargs"]["do_sample"] is False


def test_demo_mcq_loads_in_lm_eval_from_a_rendered_task_dir(tmp_path, monkeypatch):
    from lm_eval.tasks import TaskManager, get_task_dict

    include = demo_tasks.render_task_dir(tmp_path / "tasks")
    monkeypatch.chdir(tmp_path)  # the rendered YAML must not depend on the working directory
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    task = get_task_dict(["demo_mcq"], TaskManager(include_path=str(include)))["demo_mcq"]
    docs = list(task.test_docs())
    rows = [json.loads(line) for line in HELDOUT_PATH.read_text().splitlines()]
    assert len(docs) == len(rows)
    first = rows[0]
    assert task.doc_to_text(docs[0]) == data.GPQA_PROMPT_TEMPLATE.format(
        question=first["Question"], c1=first["choice1"], c2=first["choice2"], c3=first["choice3"],
        c4=first["choice4"])
    assert task.doc_to_target(docs[0]) == first["answer"]


def test_demo_calibration_and_kld_text_come_from_the_training_distribution():
    """Committed files equal what moeprune.demo.calibration generates; none holds a held-out question."""
    from moeprune.demo import calibration
    from moeprune.demo.data import heldout_mcqs

    assert calibration.CALIBRATION_PATH.read_text(encoding="utf-8") == calibration.calibration_jsonl()
    assert calibration.KLD_TEXT_PATH.read_text(encoding="utf-8") == calibration.kld_text()
    rows = calibration.calibration_prompts()
    assert {row["domain"] for row in rows} == set(calibration.DOMAINS)
    heldout = calibration.heldout_keys()
    calibrated = calibration.calibration_keys(rows)
    assert len(calibrated) == 4 * calibration.PROMPTS_PER_DOMAIN and not calibrated & heldout
    text = calibration.KLD_TEXT_PATH.read_text(encoding="utf-8")
    heldout_prompts = {q.prompt() for q in heldout_mcqs(calibration.HELDOUT_COUNT, calibration.DEMO_SEED)}
    assert not any(prompt in text for prompt in heldout_prompts)
    assert not any(row["prompt"] in text for row in rows if row["domain"].startswith("mcq-"))
