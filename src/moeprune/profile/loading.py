"""Finding, hashing and loading the model that is profiled."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moeprune.errors import MoepruneError
from moeprune.hashing import sha256_file, sha256_json

# Files whose content defines the model's computation (hashed as "the model").
MODEL_FILE_PATTERNS = ("config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json")
# Files that define how text becomes tokens (they change phase-1 inputs, not the weights).
TOKENIZER_FILE_PATTERNS = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
)


class ModelLoadError(MoepruneError):
    """The base model cannot be found or loaded."""


def _matching_files(model_dir: Path, patterns: tuple[str, ...]) -> list[Path]:
    files: set[Path] = set()
    for pattern in patterns:
        files.update(path for path in model_dir.glob(pattern) if path.is_file())
    return sorted(files)


def hash_files(model_dir: Path, patterns: tuple[str, ...]) -> tuple[str, list[str]]:
    """Tree hash of the files of ``model_dir`` matching ``patterns``: (sha256, sorted relative names)."""
    files = _matching_files(model_dir, patterns)
    listing = {path.relative_to(model_dir).as_posix(): sha256_file(path) for path in files}
    return sha256_json(listing), sorted(listing)


def model_sha256(model_dir: Path) -> tuple[str, list[str]]:
    """Tree hash of the model's weights and config (see ``MODEL_FILE_PATTERNS``) and the files hashed."""
    digest, names = hash_files(model_dir, MODEL_FILE_PATTERNS)
    if not any(name.endswith(".safetensors") for name in names):
        raise ModelLoadError(f"{model_dir}: no *.safetensors weights; only safetensors checkpoints are supported")
    return digest, names


def tokenizer_sha256(model_dir: Path) -> str:
    """Tree hash of the tokenizer and chat template files."""
    return hash_files(model_dir, TOKENIZER_FILE_PATTERNS)[0]


def load_config(model_dir: Path) -> Any:
    """The model's transformers config (no weights)."""
    from moeprune.arch import transformers_config

    try:
        return transformers_config(model_dir)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{model_dir}: cannot read the model's config ({exc})") from None


def check_weights(model_dir: Path) -> None:
    """Every safetensors shard of ``model_dir`` whole and readable (headers only, no weights).

    A truncated or corrupt shard ends here as a CheckpointError naming the shard, instead of a
    ``SafetensorError`` from deep inside transformers that names no file.
    """
    from moeprune.io.checkpoint import Checkpoint

    Checkpoint.open(model_dir).close()


def load_model(model_dir: Path, dtype: str, device_map: str) -> Any:
    """Load the model for inference with accelerate's ``device_map`` (``auto`` spreads over GPUs / offloads)."""
    import torch

    from moeprune.arch import transformers_config, transformers_model_class

    check_weights(model_dir)
    try:
        config = transformers_config(model_dir)
        cls = transformers_model_class(config)
        model = cls.from_pretrained(model_dir, dtype=getattr(torch, dtype), device_map=device_map)
    except MoepruneError:
        raise
    except Exception as exc:  # noqa: BLE001 - SafetensorError, OSError, ValueError...: one clear message
        raise ModelLoadError(
            f"{model_dir}: cannot load the model ({type(exc).__name__}: {exc}); check that the download is "
            "complete (re-download damaged shards) and that model.base points at the right directory"
        ) from None
    model.eval()
    return model


def load_tokenizer(model_dir: Path) -> Any:
    """The model's tokenizer (with its chat template)."""
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(model_dir)
    except Exception as exc:  # the tokenizers library raises a bare Exception for a damaged tokenizer.json
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise ModelLoadError(f"{model_dir}: cannot load the tokenizer ({type(exc).__name__}: {first}); "
                             "check its tokenizer files or re-download them") from None


def input_device(model: Any) -> Any:
    """Device where input ids must go (the embedding's device under a device_map)."""
    embeddings = model.get_input_embeddings()
    return embeddings.weight.device
