"""Hugging Face checkpoint -> GGUF with the pinned convert_hf_to_gguf.py, then check the result.

The converter and the ``gguf`` package it imports both come from the pinned llama.cpp tree
(``PYTHONPATH=<tree>/gguf-py``), never from whatever ``gguf`` is installed in the environment:
the GGUF layout must match the binaries that will read it.

After conversion the GGUF is read back (with the pinned gguf-py's ``GGUFReader``) and checked
against the checkpoint's config: ``<arch>.expert_count`` equals the config's expert count, every
expert tensor (and the router, and the per-expert tensors the family adapter requires) has that
many experts, and the general metadata names the base model. The file only appears at ``out_path`` when all checks pass.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from moeprune.arch import ModelSpec, arch_for_gguf, inspect
from moeprune.atomic import write_json
from moeprune.errors import MoepruneError
from moeprune.hashing import sha256_file
from moeprune.llamacpp.build import LlamaCppBuild
from moeprune.llamacpp.process import last_error_line, no_output_error, run_logged, run_tool
from moeprune.llamacpp.quantize import public_record

OUTTYPES = ("f32", "f16", "bf16", "q8_0")
CONVERTER = "convert_hf_to_gguf.py"  # in the pinned llama.cpp tree
# Tensors whose last GGUF dimension is the expert axis (ne order: fastest dimension first).
_EXPERT_TENSOR_RE = re.compile(r"^blk\.\d+\.ffn_(gate|up|down|gate_up)_exps\.weight$|^blk\.\d+\.ffn_gate_inp\.weight$")


class GGUFCheckError(MoepruneError):
    """A converted GGUF disagrees with the checkpoint it came from."""


def hf_spec(hf_dir: Path) -> ModelSpec:
    """The checkpoint's :class:`ModelSpec` (its config.json must be there)."""
    if not (hf_dir / "config.json").is_file():
        raise MoepruneError(f"{hf_dir}: no config.json; pass a Hugging Face model directory")
    from moeprune.userfile import UserFileError

    return inspect(hf_dir, "model's config.json", UserFileError)


def check_shards(hf_dir: Path) -> list[Path]:
    """Every safetensors shard whole and readable, before the converter mmaps it; the shards.

    A truncated shard would otherwise end in the converter's ``mmap length is greater than file
    size``, naming no file. Raises CheckpointError naming the shard and what to do.
    """
    from moeprune.io.checkpoint import Checkpoint

    with Checkpoint.open(hf_dir) as checkpoint:
        return list(checkpoint.shards)


SAFETENSORS_INDEX = "model.safetensors.index.json"


def source_file_hashes(hf_dir: Path, shards: list[Path]) -> dict[str, str]:
    """{file name: sha256} of what the converter reads: ``config.json``, the shard index (if any)
    and every safetensors shard. Recorded as the GGUF's ``source_files``: ``invoke verify`` follows
    it from the published safetensors to the GGUF (chain of custody)."""
    names = ["config.json", *([SAFETENSORS_INDEX] if (hf_dir / SAFETENSORS_INDEX).is_file() else []),
             *(shard.name for shard in shards)]
    return {name: sha256_file(hf_dir / name) for name in names}


def base_model_of(hf_dir: Path) -> dict[str, str]:
    """Who this checkpoint derives from: the drop map's base model if present, else the directory.

    Returns {"id": ..., "name": ..., "organization"?: ..., "repo_url"?: ...} for GGUF metadata.
    """
    from moeprune.base_model import is_hub_id

    drop_map = hf_dir / "expert_drop_metadata.json"
    base_id = None
    if drop_map.is_file():
        try:
            base_id = json.loads(drop_map.read_text())["base_model"]["id"]
        except (ValueError, KeyError, TypeError):
            base_id = None
    if not base_id:
        base_id = hf_dir.resolve().name
    entry = {"id": base_id}
    if is_hub_id(base_id):
        organization, name = base_id.split("/", 1)
        entry.update(name=name, organization=organization, repo_url=f"https://huggingface.co/{base_id}")
    else:
        entry["name"] = Path(base_id).name
    return entry


def read_gguf_info(gguf_root: Path, gguf_path: Path) -> dict[str, Any]:
    """Architecture, metadata (``general.*`` and ``<arch>.*``), tensor shapes and types of a GGUF.

    Runs the pinned gguf-py (``<gguf_root>/gguf-py``) in a subprocess so this process never
    imports a second, different ``gguf`` package. Raises GGUFCheckError when it cannot be read.
    """
    script = r"""
import json, sys
from gguf import GGUFReader
reader = GGUFReader(sys.argv[1])
def value(key):
    field = reader.get_field(key)
    return None if field is None else field.contents()
arch = value("general.architecture")
metadata = {}
for name in reader.fields:
    if name.startswith("general.") or (arch and name.startswith(arch + ".")):
        try:
            v = reader.get_field(name).contents()
        except Exception:
            continue
        if isinstance(v, (str, int, float, bool)) or (isinstance(v, list) and len(v) <= 64):
            metadata[name] = v
tensors = {t.name: [int(d) for d in t.shape] for t in reader.tensors}
types = {t.name: t.tensor_type.name for t in reader.tensors}
json.dump({"arch": arch, "metadata": metadata, "tensors": tensors, "types": types}, sys.stdout)
"""
    env = {**os.environ, "PYTHONPATH": str(gguf_root / "gguf-py"), "NO_LOCAL_GGUF": "1"}
    result = run_tool([sys.executable, "-c", script, str(gguf_path)], env=env)
    if result.returncode != 0:
        said = last_error_line(result.stderr) or f"the reader exited {result.returncode}"
        raise GGUFCheckError(f"{gguf_path}: not a readable GGUF: {said}")
    return json.loads(result.stdout)


def check_gguf(
    gguf_root: Path,
    gguf_path: Path,
    num_experts: int | None,
    base_model_name: str | None,
    adapter: Any = None,
) -> dict[str, Any]:
    """Check a GGUF against the expected expert count and base model; return what was checked.

    Raises GGUFCheckError on any mismatch.
    """
    return verify_gguf_info(read_gguf_info(gguf_root, gguf_path), gguf_path, num_experts, base_model_name, adapter)


def verify_gguf_info(
    info: dict[str, Any], gguf_path: Path, num_experts: int | None, base_model_name: str | None, adapter: Any = None
) -> dict[str, Any]:
    """Pure part of :func:`check_gguf`: compare read-back metadata/shapes with expectations.

    ``adapter`` is the checkpoint's family adapter (default: the one named by the GGUF's architecture).
    """
    arch = info["arch"]
    metadata = info["metadata"]
    tensors: dict[str, list[int]] = info["tensors"]
    problems: list[str] = []
    expert_count = metadata.get(f"{arch}.expert_count")
    expert_tensors = sorted(name for name in tensors if _EXPERT_TENSOR_RE.match(name))
    if adapter is not None and arch != adapter.gguf_arch:
        problems.append(f"general.architecture = {arch!r}, expected {adapter.gguf_arch!r} for {adapter.family}")
    adapter = arch_for_gguf(arch) if adapter is None else adapter
    required = adapter.gguf_required_tensors if adapter is not None else ()
    scale_tensors = sorted(name for name in tensors if any(re.match(pattern, name) for pattern, _ in required))
    if num_experts is not None:
        if expert_count != num_experts:
            problems.append(f"{arch}.expert_count = {expert_count}, config num_experts = {num_experts}")
        if not expert_tensors:
            problems.append("no expert tensors (blk.N.ffn_*_exps.weight) found")
        for name in expert_tensors:
            if tensors[name][-1] != num_experts:
                problems.append(f"{name} has {tensors[name][-1]} experts (shape {tensors[name]}), expected {num_experts}")
        for pattern, what in required:
            if not any(re.match(pattern, name) for name in tensors):
                problems.append(f"no {what}")
        for name in scale_tensors:
            if tensors[name] != [num_experts]:
                problems.append(f"{name} has shape {tensors[name]}, expected [{num_experts}]")
    base_names = [
        value for key, value in metadata.items()
        if re.fullmatch(r"general\.base_model\.\d+\.(name|repo_url)", key)
    ]
    if base_model_name is not None and not any(base_model_name in str(value) for value in base_names):
        problems.append(f"general.base_model.* does not name the base model {base_model_name!r} (found {base_names})")
    if problems:
        raise GGUFCheckError(f"{gguf_path}: GGUF check failed:\n  - " + "\n  - ".join(problems))
    return {
        "architecture": arch,
        "expert_count": expert_count,
        "expert_tensors_checked": len(expert_tensors),
        "down_scale_tensors_checked": len(scale_tensors),
        "tensor_count": len(tensors),
        "general": {k: v for k, v in metadata.items() if k.startswith("general.")},
    }


@contextlib.contextmanager
def converter_output(
    build: LlamaCppBuild,
    hf_dir: Path,
    out_path: Path,
    outtype: str,
    metadata_override: dict[str, Any],
    *,
    extra_args: tuple[str, ...] = (),
    log_path: Path | None = None,
) -> Iterator[Path]:
    """Run the pinned convert_hf_to_gguf.py on ``hf_dir`` (offline, with ``metadata_override`` and
    ``extra_args``, e.g. ``--mmproj``) into a temporary file beside ``out_path``; yield that file.
    The caller checks it and moves it to ``out_path``; whatever is left goes with the temporary
    directory, so nothing half-written ever has the final name."""
    out_path.parent.mkdir(parents=True, exist_ok=True)
    converter = build.root / CONVERTER
    with tempfile.TemporaryDirectory(prefix=f".{out_path.name}.tmp-", dir=out_path.parent) as tmp:
        tmp_dir = Path(tmp)
        override_path = tmp_dir / "metadata.json"
        override_path.write_text(json.dumps(metadata_override))
        tmp_out = tmp_dir / out_path.name
        command = [
            sys.executable, str(converter), str(hf_dir), "--outfile", str(tmp_out),
            "--outtype", outtype, "--metadata", str(override_path), *extra_args,
        ]
        env = {
            **os.environ,
            "PYTHONPATH": str(build.root / "gguf-py"),
            # Conversion is offline: everything it needs is in hf_dir.
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
        }
        env.pop("NO_LOCAL_GGUF", None)
        output = run_logged(command, log_path, CONVERTER, env=env, writing=out_path)
        if not tmp_out.is_file():
            raise no_output_error(CONVERTER, output, tmp_out, log_path)
        yield tmp_out


def build_fields(build: LlamaCppBuild) -> dict[str, Any]:
    """The converter and build every conversion record names."""
    return {"converter": CONVERTER, "llamacpp_key": build.key,
            "llama_cpp_commit": build.record.get("source", {}).get("llama_cpp_commit")}


def convert_to_gguf(
    build: LlamaCppBuild,
    hf_dir: Path,
    out_path: Path,
    outtype: str,
    *,
    model_name: str | None = None,
    log_path: Path | None = None,
) -> dict[str, Any]:
    """Convert ``hf_dir`` to ``out_path`` (GGUF, ``outtype`` f32/f16/bf16/q8_0) and check it.

    Returns the conversion record (also written, without local paths, to ``<out_path>.json``): converter and build,
    the sha256 of every file read (``source_files``: config, index, shards), output sha256/size and the
    checks made. ``model_name`` sets general.name.
    Raises MoepruneError when the converter fails or the result does not match the config.
    """
    hf_dir = Path(hf_dir)
    out_path = Path(out_path)
    check_outtype(outtype)
    spec = hf_spec(hf_dir)
    shards = check_shards(hf_dir)
    source_files = source_file_hashes(hf_dir, shards)  # before converting: what the converter reads
    adapter = spec.adapter
    num_experts = spec.num_experts_stated
    base = base_model_of(hf_dir)
    metadata_override: dict[str, Any] = {
        "general.base_models": [{k: v for k, v in base.items() if k != "id"}],
    }
    if model_name:
        metadata_override["general.name"] = model_name
    with converter_output(build, hf_dir, out_path, outtype, metadata_override,
                          extra_args=tuple(adapter.gguf_convert_args), log_path=log_path) as tmp_out:
        checks = check_gguf(build.root, tmp_out, num_experts, base["name"], adapter)
        return publish_conversion(build, hf_dir, tmp_out, out_path, {
            "stage": "convert", "hf_config_sha256": source_files["config.json"], "source_files": source_files,
            "num_experts": num_experts, "outtype": outtype, "base_model": base, "checks": checks})


def publish_conversion(build: LlamaCppBuild, hf_dir: Path, tmp_out: Path, out_path: Path,
                       fields: dict[str, Any]) -> dict[str, Any]:
    """Move a checked conversion to ``out_path`` and write its record (``fields`` plus the build, the
    source directory's name and the file's size and sha256) beside it, without local paths."""
    record = {
        **fields,
        **build_fields(build),
        "hf_dir_name": hf_dir.resolve().name,
        "out_path": str(out_path),
        "file": out_path.name,
        "size_bytes": tmp_out.stat().st_size,
        "sha256": sha256_file(tmp_out),
    }
    os.replace(tmp_out, out_path)
    write_json(out_path.with_name(out_path.name + ".json"), public_record(record))
    return record


def check_outtype(outtype: str) -> None:
    if outtype not in OUTTYPES:
        raise MoepruneError(f"quantize.convert_outtype = {outtype!r}: use one of {', '.join(OUTTYPES)}")
