"""Build the embedded demo model: tokenizer, Gemma-4-architecture MoE, CPU training, held-out check.

``build_demo_model(out_dir, seed)`` writes a Hugging Face model directory that loads as
``Gemma4ForConditionalGeneration`` and converts with llama.cpp's ``convert_hf_to_gguf.py``:

    config.json, generation_config.json, model-0000i-of-0000N.safetensors,
    model.safetensors.index.json, tokenizer.json, tokenizer_config.json, chat_template.jinja,
    build_record.json

Everything is seeded; the held-out accuracy in ``build_record.json`` is measured on the saved
(bf16) weights after reloading them, with greedy ``generate`` through the chat template.
"""

from __future__ import annotations

import json
import math
import platform
import random
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from moeprune.arch import arch_for_model
from moeprune.atomic import atomic_dir
from moeprune.demo import data
from moeprune.demo import tasks as demo_tasks
from moeprune.demo.tokenizer import (
    DEFAULT_VOCAB_SIZE,
    MULTIMODAL_CONFIG_FIELDS,
    chat_template_text,
    save_tokenizer,
    train_tokenizer,
)
from moeprune.hashing import sha256_file, sha256_json
from moeprune.patching import Patches

HELDOUT_COUNT = 48
DEFAULT_STEPS = 600
DEFAULT_MAX_SHARD_SIZE = "6MB"
STORAGE_DTYPE = torch.bfloat16
# One batch in GENERAL_EVERY is general text (per calibration domain) instead of MCQs.
GENERAL_EVERY = 5
# Fraction of conversations rendered with thinking disabled (the template then pre-fills an empty
# thought channel); the rest think first, as the eval and calibration recipes do.
NO_THINK_FRACTION = 0.2
AUX_LOSS_COEF = 0.01
# Gemma's final-logit soft cap: the config states it and the training loss applies it (one value).
FINAL_LOGIT_SOFTCAP = 30.0
PROMPT_LOSS_WEIGHT = 0.0

STRICT_RE = re.compile(r"(?<=The answer is )(.*)(?=.)")  # gpqa cot strict-match
FLEX_RE = re.compile(r"(\([A-Z]\))")  # gpqa cot flexible-extract (last match)


def demo_text_config_kwargs(vocab_size: int = DEFAULT_VOCAB_SIZE) -> dict[str, Any]:
    """Gemma4TextConfig arguments: the real 26B-A4B layout, scaled down for 2 CPU cores."""
    return {
        "vocab_size": vocab_size,
        "hidden_size": 256,
        "intermediate_size": 256,  # dense MLP beside the MoE block
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "global_head_dim": 128,
        "num_global_key_value_heads": 1,
        "attention_k_eq_v": True,
        "enable_moe_block": True,
        "num_experts": 16,
        "top_k_experts": 2,
        "moe_intermediate_size": 64,
        "hidden_size_per_layer_input": 0,
        "vocab_size_per_layer_input": vocab_size,
        "num_kv_shared_layers": 0,
        "sliding_window": 128,
        "layer_types": ["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"],
        "final_logit_softcapping": FINAL_LOGIT_SOFTCAP,
        "max_position_embeddings": 4096,
        "hidden_activation": "gelu_pytorch_tanh",
        "tie_word_embeddings": True,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "bos_token_id": 2,
    }


def make_config(tokenizer_vocab: dict[str, int], vocab_size: int = DEFAULT_VOCAB_SIZE):
    """Text-only Gemma4Config (vision and audio towers absent) whose token ids match the tokenizer."""
    from transformers import Gemma4Config, Gemma4TextConfig

    text = Gemma4TextConfig(**demo_text_config_kwargs(vocab_size))
    mm_ids = {field: tokenizer_vocab[token] for token, field in MULTIMODAL_CONFIG_FIELDS.items()}
    cfg = Gemma4Config(text_config=text, vision_config=None, audio_config=None, **mm_ids)
    cfg.pad_token_id, cfg.eos_token_id, cfg.bos_token_id = 0, 1, 2
    return cfg


def _generation_config(turn_end_id: int):
    from transformers import GenerationConfig

    return GenerationConfig(bos_token_id=2, eos_token_id=[1, turn_end_id], pad_token_id=0, do_sample=False)


# ---------------------------------------------------------------------------------------------
# Conversations -> token ids with per-token loss weights.


def _conversation(tok, prompt: str, thought: str, reply: str, think: bool) -> tuple[list[int], list[float]]:
    """Token ids of one chat exchange and a loss weight per position (for predicting that token)."""
    prompt_ids = tok.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, enable_thinking=think, tokenize=True
    )
    if hasattr(prompt_ids, "keys"):
        prompt_ids = prompt_ids["input_ids"]
    target = (f"<|channel>thought\n{thought}<channel|>" if think else "") + f"{reply}<turn|>"
    target_ids = tok(target, add_special_tokens=False)["input_ids"]
    ids = list(prompt_ids) + list(target_ids)
    weights = [PROMPT_LOSS_WEIGHT] * len(prompt_ids) + [1.0] * len(target_ids)
    weights[0] = 0.0  # nothing predicts <bos>
    return ids, weights


class _Stream:
    """Seeded stream of training conversations (held-out questions excluded)."""

    def __init__(self, tok, seed: int, exclude: set) -> None:
        self.tok = tok
        self.rng = random.Random(f"demo-train-{seed}")
        self.mcqs = data.training_mcqs(random.Random(f"demo-train-mcq-{seed}"), exclude)

    def next(self, general: bool) -> tuple[list[int], list[float]]:
        think = self.rng.random() >= NO_THINK_FRACTION
        if general:
            _, prompt, thought, reply = data.general_example(self.rng)
        else:
            q = next(self.mcqs)
            # Without a thinking channel the model reasons in the visible reply instead.
            prompt, thought, reply = q.prompt(), q.thought(), q.reply(with_steps=not think)
        return _conversation(self.tok, prompt, thought, reply, think)

    def batch(self, size: int, general: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One padded batch; general-text and MCQ batches are kept apart so padding stays small."""
        rows = [self.next(general) for _ in range(size)]
        width = max(len(ids) for ids, _ in rows)
        input_ids = torch.zeros(size, width, dtype=torch.long)
        attention = torch.zeros(size, width, dtype=torch.long)
        weights = torch.zeros(size, width)
        for i, (ids, w) in enumerate(rows):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            attention[i, : len(ids)] = 1
            weights[i, : len(ids)] = torch.tensor(w)
        return input_ids, attention, weights


# ---------------------------------------------------------------------------------------------
# Training.


@torch.no_grad()
def _probe_accuracy(model, tok, seed: int) -> float:
    """Teacher-forced accuracy on the reply tokens of the held-out questions (a training monitor)."""
    was_training = model.training
    model.eval()
    rows = [_conversation(tok, q.prompt(), q.thought(), q.reply(), True) for q in data.heldout_mcqs(HELDOUT_COUNT, seed)]
    width = max(len(ids) for ids, _ in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    att = torch.zeros_like(ids)
    for i, (r, _) in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        att[i, : len(r)] = 1
    pred = model(input_ids=ids, attention_mask=att).logits.argmax(-1)
    correct = total = 0
    for i, (r, w) in enumerate(rows):
        for t in range(1, len(r)):
            if w[t] > 0:
                total += 1
                correct += int(pred[i, t - 1] == r[t])
    model.train(was_training)
    return correct / max(total, 1)


def _softcap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """Gemma's final-logit soft-capping, as in Gemma4ForConditionalGeneration.forward."""
    return logits if not cap else torch.tanh(logits / cap) * cap


def _router_hooks(model, store: list, patches: Patches) -> None:
    """Capture (router probabilities, top-k index) of every MoE layer for the load-balancing loss."""
    for layer in model.model.language_model.layers:
        if getattr(layer, "router", None) is not None:
            patches.forward_hook(layer.router, lambda _m, _i, out: store.append((out[0], out[2])))


def _balance_loss(captured: list, token_mask: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Switch-Transformer auxiliary loss, averaged over MoE layers (padding tokens excluded)."""
    mask = token_mask.reshape(-1).float()
    total = mask.sum().clamp(min=1.0)
    losses = []
    for probs, top_idx in captured:
        prob_mean = (probs * mask[:, None]).sum(0) / total
        hits = torch.zeros(probs.shape[0], num_experts).scatter_(1, top_idx, 1.0)
        frac = (hits * mask[:, None]).sum(0) / (total * top_idx.shape[1])
        losses.append(num_experts * (frac * prob_mean).sum())
    return torch.stack(losses).mean()


def train_model(
    model,
    tok,
    seed: int,
    steps: int,
    batch_size: int = 16,
    lr: float = 3e-3,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train in place with AdamW + cosine schedule; returns loss statistics."""
    exclude = {q.key for q in data.heldout_mcqs(HELDOUT_COUNT, seed)}
    stream = _Stream(tok, seed, exclude)
    num_experts = arch_for_model(model).model_num_experts(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        optim,
        lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))),
    )
    captured: list = []
    model.train()
    history: list[float] = []
    started = time.monotonic()
    with Patches() as patches:
        _router_hooks(model, captured, patches)
        for step in range(steps):
            # Every GENERAL_EVERY-th batch is general text, the rest are questions.
            input_ids, attention, weights = stream.batch(batch_size, general=step % GENERAL_EVERY == GENERAL_EVERY - 1)
            captured.clear()
            hidden = model.model(input_ids=input_ids, attention_mask=attention).last_hidden_state
            # Position t predicts token t+1, weighted by the weight of token t+1; the (costly)
            # vocabulary projection is computed only where that weight is non-zero.
            w = weights[:, 1:].reshape(-1)
            keep = w > 0
            h = hidden[:, :-1].reshape(-1, hidden.shape[-1])[keep]
            logits = _softcap(model.lm_head(h), FINAL_LOGIT_SOFTCAP)
            ce = torch.nn.functional.cross_entropy(logits, input_ids[:, 1:].reshape(-1)[keep], reduction="none")
            lm_loss = (ce * w[keep]).sum() / w[keep].sum()
            aux = _balance_loss(captured, attention, num_experts)
            loss = lm_loss + AUX_LOSS_COEF * aux
            optim.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optim.step()
            sched.step()
            history.append(float(lm_loss.detach()))
            if step % 40 == 0 or step == steps - 1:
                probe = _probe_accuracy(model, tok, seed)
                log(
                    f"step {step:5d}/{steps} lm_loss {float(lm_loss):.4f} aux {float(aux):.3f} "
                    f"lr {sched.get_last_lr()[0]:.2e} elapsed {time.monotonic() - started:.0f}s"
                    + (f" heldout_token_acc {probe:.3f}" if probe is not None else "")
                )
    model.eval()
    tail = history[-50:] if history else [float("nan")]
    return {"final_lm_loss": sum(tail) / len(tail), "train_wall_s": time.monotonic() - started}


# ---------------------------------------------------------------------------------------------
# Held-out evaluation.


def split_reply(text: str) -> tuple[str, str]:
    """(thought, visible content) of a generated model turn, as llama.cpp's deepseek format splits it."""
    m = re.search(r"<\|channel>thought\s*(.*?)<channel\|>", text, flags=re.S)
    thought = m.group(1) if m else ""
    content = text[m.end():] if m else text
    content = content.split("<turn|>")[0].replace("<eos>", "")
    return thought.strip(), content.strip()


def extract_answers(content: str) -> tuple[str | None, str | None]:
    """(strict-match, flexible-extract) answers, mirroring lm-eval's gpqa cot filters."""
    strict = STRICT_RE.search(content)
    flex = FLEX_RE.findall(content)
    return (strict.group(1) if strict else None), (flex[-1] if flex else None)


@torch.no_grad()
def evaluate_heldout(
    model, tok, questions: list[data.MCQ], enable_thinking: bool = True, max_new_tokens: int = 96, batch_size: int = 16
) -> dict[str, Any]:
    """Greedy generation through the chat template; accuracy under both gpqa filters."""
    tok.padding_side = "left"
    turn_end = tok.convert_tokens_to_ids("<turn|>")
    strict_ok = flex_ok = 0
    samples = []
    for start in range(0, len(questions), batch_size):
        chunk = questions[start:start + batch_size]
        texts = [
            tok.apply_chat_template(
                [{"role": "user", "content": q.prompt()}], add_generation_prompt=True,
                enable_thinking=enable_thinking, tokenize=False,
            )
            for q in chunk
        ]
        enc = tok(texts, add_special_tokens=False, return_tensors="pt", padding=True)
        out = model.generate(
            **enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=[1, turn_end], pad_token_id=0
        )
        for q, row in zip(chunk, out[:, enc["input_ids"].shape[1]:], strict=True):
            text = tok.decode(row, skip_special_tokens=False).replace("<pad>", "")
            _, content = split_reply(text)
            strict, flex = extract_answers(content)
            gold = f"({q.answer_letter})"
            strict_ok += int(strict is not None and strict.strip() == gold)
            flex_ok += int(flex == gold)
            if len(samples) < 4:
                samples.append({"prompt_kind": q.kind, "gold": gold, "generated": text})
    n = len(questions)
    return {
        "num_questions": n,
        "enable_thinking": enable_thinking,
        "strict_match_accuracy": strict_ok / n,
        "flexible_extract_accuracy": flex_ok / n,
        "samples": samples,
    }


# ---------------------------------------------------------------------------------------------
# Saving.


def write_heldout_dataset(path: Path, questions: list[data.MCQ]) -> None:
    """The held-out questions as JSON lines (the demo_mcq lm-eval dataset)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for q in questions:
            handle.write(json.dumps(q.to_lm_eval_doc(), ensure_ascii=False) + "\n")


def _save_model_dir(model, tok_obj, out_dir: Path, max_shard_size: str) -> None:
    model = model.to(STORAGE_DTYPE)
    model.save_pretrained(out_dir, max_shard_size=max_shard_size, safe_serialization=True)
    model.to(torch.float32)
    save_tokenizer(tok_obj, out_dir, chat_template_text())
    turn_end = tok_obj.token_to_id("<turn|>")
    _generation_config(turn_end).save_pretrained(out_dir)


def build_demo_model(
    out_dir: Path,
    seed: int = 0,
    steps: int = DEFAULT_STEPS,
    threads: int = 1,
    max_shard_size: str = DEFAULT_MAX_SHARD_SIZE,
    heldout_path: Path | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Build, train (``steps`` = 0: random init) and save the demo model atomically into ``out_dir``.

    Returns the build record that is also written to ``out_dir/build_record.json``. If
    ``heldout_path`` is given, the held-out questions are written there as the demo_mcq dataset
    (and, when it is the packaged dataset, the packaged demo_mcq.yaml is rewritten too).
    """
    import transformers
    from transformers import AutoTokenizer, Gemma4ForConditionalGeneration

    started = time.monotonic()
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    random.seed(seed)

    corpus = data.tokenizer_corpus(seed)
    tok_obj = train_tokenizer(corpus)
    questions = data.heldout_mcqs(HELDOUT_COUNT, seed)

    with atomic_dir(Path(out_dir)) as tmp:
        save_tokenizer(tok_obj, tmp, chat_template_text())
        tok = AutoTokenizer.from_pretrained(tmp)
        cfg = make_config(tok_obj.get_vocab())
        torch.manual_seed(seed)
        model = Gemma4ForConditionalGeneration(cfg).float()
        train_stats: dict[str, Any] = {"final_lm_loss": None, "train_wall_s": 0.0}
        if steps > 0:
            train_stats = train_model(model, tok, seed, steps, log=log)
        _save_model_dir(model, tok_obj, tmp, max_shard_size)

        # Measure on what was saved: reload the bf16 shards, evaluate in float32.
        saved = Gemma4ForConditionalGeneration.from_pretrained(tmp, dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(tmp)
        think_eval = evaluate_heldout(saved, tok, questions, enable_thinking=True)
        log(
            f"held-out (thinking): strict {think_eval['strict_match_accuracy']:.3f} "
            f"flexible {think_eval['flexible_extract_accuracy']:.3f}"
        )
        nothink_eval = evaluate_heldout(saved, tok, questions, enable_thinking=False)
        log(
            f"held-out (no thinking): strict {nothink_eval['strict_match_accuracy']:.3f} "
            f"flexible {nothink_eval['flexible_extract_accuracy']:.3f}"
        )
        shards = sorted(p.name for p in tmp.glob("model-*.safetensors"))
        weights_bytes = sum((tmp / s).stat().st_size for s in shards)
        record = {
            "format_version": 1,
            "seed": seed,
            "steps": steps,
            "trained": steps > 0,
            "data_sha256": sha256_json(
                {"tokenizer_corpus": corpus, "heldout": [q.to_lm_eval_doc() for q in questions],
                 "general_every": GENERAL_EVERY, "no_think_fraction": NO_THINK_FRACTION}
            ),
            "tokenizer_sha256": sha256_file(tmp / "tokenizer.json"),
            "chat_template_sha256": sha256_file(tmp / "chat_template.jinja"),
            "heldout": {
                "num_questions": len(questions),
                "accuracy": think_eval["flexible_extract_accuracy"],
                "greedy_generation_accuracy": think_eval["flexible_extract_accuracy"],
                "strict_match_accuracy": think_eval["strict_match_accuracy"],
                "flexible_extract_accuracy": think_eval["flexible_extract_accuracy"],
                "no_thinking": {k: nothink_eval[k] for k in ("strict_match_accuracy", "flexible_extract_accuracy")},
                "enable_thinking": True,
                "samples": think_eval["samples"],
            },
            "training": {
                **train_stats,
                "batch_size": 16,
                "aux_loss_coef": AUX_LOSS_COEF,
                "threads": threads,
            },
            "model": {
                "num_parameters": sum(p.numel() for p in saved.parameters()),
                "storage_dtype": str(STORAGE_DTYPE).removeprefix("torch."),
                "num_shards": len(shards),
                "weights_bytes": weights_bytes,
            },
            "versions": {
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "python": platform.python_version(),
            },
            "wall_s": time.monotonic() - started,
        }
        (tmp / "build_record.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    if heldout_path is not None:
        write_heldout_dataset(Path(heldout_path), questions)
        if Path(heldout_path).resolve() == demo_tasks.DATA_PATH:
            demo_tasks.write_committed_yaml()
    return record
