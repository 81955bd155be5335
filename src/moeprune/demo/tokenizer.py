"""A small BPE tokenizer in Gemma 4's format, trained on the demo corpus.

Format (what llama.cpp's ``gemma4`` tokenizer and transformers' ``GemmaTokenizer`` expect):

* ``tokenizer.json``: model ``BPE`` with ``byte_fallback: true`` and ``<unk>``; normalizer
  ``Replace(" " -> "▁")`` (SentencePiece-style: spaces become U+2581 and merges run on raw
  UTF-8); pre-tokenizer ``Split(" ", merged_with_previous)`` as in ``GemmaTokenizer`` (a no-op
  after the normalizer); decoder ``Sequence[Replace("▁" -> " "), ByteFallback, Fuse]``.
* Gemma 4's special tokens at Gemma 4's ids: ``<pad>``=0, ``<eos>``=1, ``<bos>``=2, ``<unk>``=3,
  ``<mask>``=4, ``<|tool>``=46 ... ``<|"|>``=52, ``<|think|>``=98, ``<|channel>``=100,
  ``<channel|>``=101, ``<|turn>``=105, ``<turn|>``=106, ``"\\n"``=107; the gaps hold
  ``<unusedN>`` tokens; the 256 byte-fallback tokens ``<0x00>``..``<0xFF>`` follow; the
  multimodal markers sit at the end of the vocabulary, as in Gemma 4.
* A ``TemplateProcessing`` post-processor prepends ``<bos>`` when special tokens are requested.
* No merge ever joins a newline to anything else, so llama.cpp (which splits text on newlines
  before BPE) and the Hugging Face tokenizer produce the same ids.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

# id -> token for every Gemma 4 control token the demo keeps at its Gemma 4 id.
GEMMA4_FIXED_SPECIALS: dict[int, str] = {
    0: "<pad>",
    1: "<eos>",
    2: "<bos>",
    3: "<unk>",
    4: "<mask>",
    46: "<|tool>",
    47: "<tool|>",
    48: "<|tool_call>",
    49: "<tool_call|>",
    50: "<|tool_response>",
    51: "<tool_response|>",
    52: '<|"|>',
    98: "<|think|>",
    100: "<|channel>",
    101: "<channel|>",
    105: "<|turn>",
    106: "<turn|>",
}
NEWLINE_ID = 107
FIRST_BYTE_ID = 108
# Multimodal markers, placed at the end of the vocabulary in this order (Gemma 4 keeps them at the
# top of its 262k vocabulary too); config.json points its *_token_id fields at them.
MULTIMODAL_TOKENS = ("<|image>", "<|audio>", "<|image|>", "<|audio|>", "<image|>", "<audio|>", "<|video|>")
MULTIMODAL_CONFIG_FIELDS = {
    "<|image>": "boi_token_id",
    "<|audio>": "boa_token_id",
    "<|image|>": "image_token_id",
    "<|audio|>": "audio_token_id",
    "<image|>": "eoi_token_id",
    "<audio|>": "eoa_token_index",
    "<|video|>": "video_token_id",
}

DEFAULT_VOCAB_SIZE = 1536
# Longest learned token, in characters: long enough for common phrases, short enough to look like text.
MAX_TOKEN_CHARS = 16

# Training-time split: runs of digits (so the frequent two-digit numbers of the demo task become
# single tokens, which a small model learns to compare far faster than digit pairs), single
# newlines, and everything in between (merges may span words, as in SentencePiece-style BPE, which
# keeps the demo's sequences short). It only limits which merges are learned; the saved tokenizer
# does not pre-split, exactly like Gemma's.
_TRAIN_SPLIT = Regex(r"\p{N}+|\n|[^\p{N}\n]+")


def _layout(vocab_size: int) -> tuple[dict[int, str], int]:
    """Reserved ids -> tokens, and how many ids remain for learned symbols."""
    reserved: dict[int, str] = {}
    for idx in range(0, FIRST_BYTE_ID):
        reserved[idx] = GEMMA4_FIXED_SPECIALS.get(idx, f"<unused{idx}>")
    reserved[NEWLINE_ID] = "\n"
    for byte in range(256):
        reserved[FIRST_BYTE_ID + byte] = f"<0x{byte:02X}>"
    for offset, token in enumerate(MULTIMODAL_TOKENS):
        reserved[vocab_size - len(MULTIMODAL_TOKENS) + offset] = token
    learned = vocab_size - len(reserved)
    return reserved, learned


def special_token_strings(vocab_size: int = DEFAULT_VOCAB_SIZE) -> list[str]:
    """Every control token (all reserved ids except the newline and the byte tokens)."""
    reserved, _ = _layout(vocab_size)
    return [t for i, t in sorted(reserved.items()) if i != NEWLINE_ID and not t.startswith("<0x")]


def train_tokenizer(corpus: list[str], vocab_size: int = DEFAULT_VOCAB_SIZE) -> Tokenizer:
    """Learn merges on ``corpus`` and lay the vocabulary out in Gemma 4's order. Deterministic."""
    reserved, learned_slots = _layout(vocab_size)

    trainer_tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    trainer_tok.normalizer = normalizers.Replace(" ", "▁")
    trainer_tok.pre_tokenizer = pre_tokenizers.Split(_TRAIN_SPLIT, behavior="isolated")
    trainer = trainers.BpeTrainer(
        vocab_size=learned_slots,
        min_frequency=2,
        show_progress=False,
        special_tokens=[],
        limit_alphabet=400,
        max_token_length=MAX_TOKEN_CHARS,
    )
    trainer_tok.train_from_iterator(corpus, trainer=trainer)
    trained = json.loads(trainer_tok.to_str())["model"]
    trained_vocab: dict[str, int] = trained["vocab"]
    merges = [m if isinstance(m, list) else m.split(" ") for m in trained["merges"]]
    # Never merge across a newline: llama.cpp splits on newlines before BPE.
    merges = [m for m in merges if "\n" not in m[0] and "\n" not in m[1]]

    vocab: dict[str, int] = {tok: idx for idx, tok in reserved.items()}
    free_ids = [i for i in range(vocab_size) if i not in reserved]
    learned_tokens = [t for t, _ in sorted(trained_vocab.items(), key=lambda kv: kv[1]) if t not in vocab]
    # Keep only merges whose result fits; merges are ordered, so a prefix of them is self-consistent.
    kept_tokens: list[str] = []
    kept_set: set[str] = set()
    chars = [t for t in learned_tokens if len(t) == 1]
    for ch in chars:
        kept_tokens.append(ch)
        kept_set.add(ch)
    kept_merges: list[list[str]] = []
    for left, right in merges:
        if len(kept_tokens) >= len(free_ids):
            break
        merged = left + right
        if (left in kept_set or left in vocab) and (right in kept_set or right in vocab):
            kept_merges.append([left, right])
            if merged not in kept_set and merged not in vocab:
                kept_tokens.append(merged)
                kept_set.add(merged)
    for token_id, token in zip(free_ids, kept_tokens, strict=False):
        vocab[token] = token_id
    # Unused slots (corpus too small to fill the vocabulary) become <unusedN> control tokens.
    fillers = [f"<unused{token_id}>" for token_id in free_ids[len(kept_tokens):]]
    for token_id, token in zip(free_ids[len(kept_tokens):], fillers, strict=True):
        vocab[token] = token_id

    tok = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=[tuple(m) for m in kept_merges],
            unk_token="<unk>",
            byte_fallback=True,
            fuse_unk=True,
            dropout=None,
        )
    )
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous", invert=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    # add_special_tokens=True prepends <bos> (chat templates write it themselves).
    tok.post_processor = processors.TemplateProcessing(
        single="<bos>:0 $A:0", pair="<bos>:0 $A:0 <bos>:1 $B:1", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    specials = [
        AddedToken(t, special=True, normalized=False, lstrip=False, rstrip=False, single_word=False)
        for t in special_token_strings(vocab_size) + fillers
    ]
    tok.add_special_tokens(specials)
    return tok


def control_tokens(tok: Tokenizer) -> list[str]:
    """Every special (control) token of ``tok``, in id order."""
    decoder = tok.get_added_tokens_decoder()
    return [decoder[i].content for i in sorted(decoder) if decoder[i].special]


def tokenizer_config(tok: Tokenizer) -> dict[str, Any]:
    """tokenizer_config.json: GemmaTokenizer, BOS added, every control token listed as special.

    Listing them in ``extra_special_tokens`` makes transformers report them in
    ``all_special_ids``, which llama.cpp's converter turns into CONTROL token types.
    """
    named = {"<pad>", "<eos>", "<bos>", "<unk>", "<mask>"}
    return {
        "tokenizer_class": "GemmaTokenizer",
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "mask_token": "<mask>",
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "padding_side": "left",
        "model_max_length": 4096,
        "extra_special_tokens": [t for t in control_tokens(tok) if t not in named],
    }


def save_tokenizer(tok: Tokenizer, out_dir: Path, chat_template: str) -> None:
    """Write tokenizer.json, tokenizer_config.json and chat_template.jinja into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"), pretty=False)
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(tokenizer_config(tok), indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    (out_dir / "chat_template.jinja").write_text(chat_template, encoding="utf-8")


def chat_template_text() -> str:
    """Gemma 4's chat template (system/user/model turns, ``enable_thinking`` flag, tool calls)."""
    return (Path(__file__).parent / "templates" / "chat_template.jinja").read_text(encoding="utf-8")
