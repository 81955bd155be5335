"""The vision projector (``mmproj``) of a multimodal base, converted once with the pinned converter.

The text GGUFs hold the language model only; llama-server takes images with a second GGUF, the
projector, made by ``convert_hf_to_gguf.py --mmproj``. Pruning touches routed experts only, so
the pruned checkpoint's tower tensors are the base's, bit for bit: one projector, converted from
the base, serves base and pruned alike, and a new drop map does not remake it.

Its record (``mmproj-<TYPE>.gguf.json``, stage ``mmproj``) carries, besides the files the converter
read, ``tower_sha256``: one digest over every tower tensor's name, dtype, shape and bytes
(:func:`tower_digest`). ``invoke verify`` recomputes that digest from the published safetensors,
so the projector is followed to the published checkpoint although it was converted from the base.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from moeprune.arch.patterns import TOWER_MARKERS
from moeprune.errors import MoepruneError
from moeprune.llamacpp.build import LlamaCppBuild
from moeprune.llamacpp.convert import (GGUFCheckError, base_model_of, check_outtype, check_shards, converter_output,
                                       hf_spec, publish_conversion, read_gguf_info, source_file_hashes)

STAGE = "mmproj"
# The projector GGUF's own identity, as the pinned converter writes it (gguf-py: GGUFType.MMPROJ).
MMPROJ_ARCH = "clip"
MMPROJ_TYPE = "mmproj"
_DIGEST_CHUNK_BYTES = 1 << 24


def has_vision_tower(hf_dir: Path) -> bool:
    """Whether the checkpoint's config declares a vision tower (the only tower a projector serves here)."""
    return "vision" in hf_spec(hf_dir).towers


def is_tower_tensor(name: str) -> bool:
    return any(marker in name for marker in TOWER_MARKERS)


def tower_digest(hf_dir: Path) -> tuple[str, int]:
    """(sha256, tensor count) over every multimodal tower tensor of a checkpoint, in name order:
    each tensor's name, dtype, shape, then its bytes. Equal digests mean equal towers, whatever
    the shards' layout (a pruned checkpoint re-shards)."""
    from moeprune.io.checkpoint import Checkpoint

    digest = hashlib.sha256()
    count = 0
    with Checkpoint.open(hf_dir) as checkpoint:
        for name in sorted(checkpoint.names()):
            if not is_tower_tensor(name):
                continue
            info = checkpoint[name]
            digest.update(json.dumps([name, info.dtype, list(info.shape)]).encode() + b"\n")
            for start in range(0, info.nbytes, _DIGEST_CHUNK_BYTES):
                digest.update(checkpoint.read(info, start, min(_DIGEST_CHUNK_BYTES, info.nbytes - start)))
            count += 1
    return digest.hexdigest(), count


def check_mmproj_info(info: dict[str, Any], gguf_path: Path, text_hidden_size: int | None) -> dict[str, Any]:
    """Pure: the read-back projector is a vision projector for a text model of ``text_hidden_size``."""
    metadata, tensors = info["metadata"], info["tensors"]
    problems = []
    if info["arch"] != MMPROJ_ARCH:
        problems.append(f"general.architecture = {info['arch']!r}, expected {MMPROJ_ARCH!r}")
    if metadata.get("general.type") != MMPROJ_TYPE:
        problems.append(f"general.type = {metadata.get('general.type')!r}, expected {MMPROJ_TYPE!r}")
    if metadata.get("clip.has_vision_encoder") is not True:
        problems.append("clip.has_vision_encoder is not true")
    projection = metadata.get("clip.vision.projection_dim")
    if text_hidden_size is not None and projection != text_hidden_size:
        problems.append(f"clip.vision.projection_dim = {projection}, the text model's hidden size is {text_hidden_size}")
    if not tensors:
        problems.append("no tensors")
    if problems:
        raise GGUFCheckError(f"{gguf_path}: projector check failed:\n  - " + "\n  - ".join(problems))
    return {"architecture": info["arch"], "projector_type": metadata.get("clip.vision.projector_type"),
            "projection_dim": projection, "tensor_count": len(tensors)}


def convert_mmproj(build: LlamaCppBuild, hf_dir: Path, out_path: Path, outtype: str, *,
                   log_path: Path | None = None) -> dict[str, Any]:
    """Convert the vision projector of ``hf_dir`` to ``out_path`` (``--mmproj``) and check it; write
    and return its record (as :func:`moeprune.llamacpp.convert.convert_to_gguf` does for a model)."""
    hf_dir, out_path = Path(hf_dir), Path(out_path)
    check_outtype(outtype)
    spec = hf_spec(hf_dir)
    if "vision" not in spec.towers:
        raise MoepruneError(f"{hf_dir / 'config.json'}: no vision_config, so there is no projector to convert")
    shards = check_shards(hf_dir)
    source_files = source_file_hashes(hf_dir, shards)
    tower_sha256, tower_tensors = tower_digest(hf_dir)
    base = base_model_of(hf_dir)
    override = {"general.base_models": [{k: v for k, v in base.items() if k != "id"}]}
    with converter_output(build, hf_dir, out_path, outtype, override, extra_args=("--mmproj",),
                          log_path=log_path) as tmp_out:
        checks = check_mmproj_info(read_gguf_info(build.root, tmp_out), out_path, spec.text_int("hidden_size"))
        return publish_conversion(build, hf_dir, tmp_out, out_path, {
            "stage": STAGE, "source_files": source_files, "tower_sha256": tower_sha256,
            "tower_tensors": tower_tensors, "outtype": outtype, "base_model": base, "checks": checks})
