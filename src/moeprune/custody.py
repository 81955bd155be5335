"""Chain of custody: from the published safetensors to the scored samples (pure: dicts in, findings out).

Each link is a record moeprune writes when it makes the next file:

1. ``<name>-<TYPE>.gguf.json`` of a converted GGUF (stage ``convert``): ``source_files``, the sha256
   of the ``config.json``, shard index and every safetensors shard the converter read;
2. ``<name>-<TYPE>.gguf.json`` of a quantized GGUF (stage ``quantize``): ``in_sha256``, the GGUF it
   was quantized from (and ``imatrix_sha256``);
3. ``eval/<model>/run.json``: ``gguf.sha256``, the GGUF the server served while the samples were
   scored (the scores themselves are recomputed from the samples by verify's other checks).
4. ``mmproj-<TYPE>.gguf.json`` of the vision projector (stage ``mmproj``), converted from the base:
   ``tower_sha256``, the digest of the tower tensors it was made from, which must equal the
   published checkpoint's (:func:`moeprune.llamacpp.mmproj.tower_digest`): pruning leaves the tower
   untouched, so the base's projector serves the pruned model.

:func:`chain_problems` follows every GGUF of the manifest back to the safetensors: the pruned
model's to the published shards, the base model's to the base checkpoint's (when given); the plain
pruned model's (a recalibrated run measures it beside the published one) to its own records only. A GGUF,
record or eval that does not descend from them is a finding naming the file.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

ROLE_OF_LIST = {"files": "pruned", "unpublished": "base"}  # manifest list -> whose GGUF it holds, by default


@dataclass
class Chain:
    """The findings, and which GGUF files were followed back to the safetensors."""

    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    descends: dict[str, bool] = field(default_factory=dict)  # GGUF file -> chain to the safetensors intact
    links: int = 0


def gguf_entries(manifest: Mapping[str, Any]) -> dict[str, tuple[str, dict[str, Any]]]:
    """{GGUF file: (role, manifest entry)} of every ``.gguf`` file the manifest lists: an unpublished
    one is the base's unless its name (:meth:`RunLayout.gguf_role`) says it is the plain pruned model's."""
    from pathlib import Path

    from moeprune.layout import RunLayout

    layout = RunLayout(Path(str(manifest.get("run") or "run")))
    out = {}
    for key, role in ROLE_OF_LIST.items():
        for entry in manifest.get(key) or []:
            if entry.get("repo") == "gguf" and entry["path"].endswith(".gguf"):
                named = layout.gguf_role(entry["path"]) if key == "unpublished" else None
                out[entry["path"]] = ("plain" if named == "plain" else role, entry)
    return out


def chain_problems(manifest: Mapping[str, Any], records: Mapping[str, dict[str, Any] | None],
                   served: Mapping[str, dict[str, Any]], base_files: Mapping[str, str] | None,
                   published_tower: str | None = None) -> Chain:
    """Follow every link.

    ``records``: {GGUF file: its ``.gguf.json`` record, or None when the record is listed but not
    at hand (a GGUF repository not downloaded, an unpublished base record)}; a GGUF whose record
    the manifest does not list at all is a finding. ``served``: {model: ``eval/<model>/run.json``}.
    ``base_files``: {file name: sha256} of the base checkpoint (``--base``), or None.
    ``published_tower``: the tower digest of the published checkpoint (None: not computed).
    """
    chain = Chain()
    ggufs = gguf_entries(manifest)
    published_model = {e["path"]: e["sha256"] for e in manifest.get("files") or [] if e.get("repo") == "model"}
    by_sha: dict[tuple[str, str], str] = {(role, entry["sha256"]): name for name, (role, entry) in ggufs.items()}
    stages: dict[str, dict[str, Any]] = {}
    for name, (role, entry) in sorted(ggufs.items()):
        if name not in records:
            chain.problems.append(f"gguf:{name}: no record {name}.json in the manifest; its origin is unknown "
                                  "(rerun the stage that makes it, then `invoke manifest`)")
            continue
        record = records[name]
        if record is None:
            chain.notes.append(f"{name}: record not at hand (not downloaded / not published)")
            continue
        if record.get("sha256") != entry["sha256"]:
            chain.problems.append(f"gguf:{name}.json: records sha256 {record.get('sha256')}, but {name} has "
                                  f"{entry['sha256']}: the record is of another file")
            continue
        stages[name] = record

    def descends(name: str, seen: frozenset[str] = frozenset()) -> bool:
        if name in chain.descends:
            return chain.descends[name]
        if name in seen or name not in stages:
            return False
        record, (role, _) = stages[name], ggufs[name]
        ok = False
        if record.get("stage") == "convert":
            ok = _converted_from(name, role, record, published_model, base_files, chain)
        elif record.get("stage") == "quantize":
            parent = by_sha.get((role, str(record.get("in_sha256"))))
            if parent is None:
                chain.problems.append(f"gguf:{name}: quantized from a GGUF with sha256 {record.get('in_sha256')} "
                                      f"({record.get('in_file')}), which is no GGUF of the {role} model in the manifest")
            else:
                chain.links += 1
                ok = descends(parent, seen | {name})
            imatrix = record.get("imatrix_sha256")
            if imatrix is not None and (role, imatrix) not in by_sha:
                chain.problems.append(f"gguf:{name}: made with an importance matrix of sha256 {imatrix}, which is no "
                                      f"file of the {role} model in the manifest")
                ok = False
        elif record.get("stage") == "mmproj":
            ok = _projector_of(name, record, published_tower, base_files, chain)
        elif record.get("stage") == "imatrix":
            parent = by_sha.get((role, str(record.get("gguf_sha256"))))
            ok = parent is not None and descends(parent, seen | {name})
            if parent is None:
                chain.problems.append(f"gguf:{name}: computed on a GGUF with sha256 {record.get('gguf_sha256')}, which "
                                      f"is no GGUF of the {role} model in the manifest")
        else:
            chain.problems.append(f"gguf:{name}.json: stage {record.get('stage')!r} is not convert, quantize, imatrix or mmproj")
        chain.descends[name] = ok
        return ok

    for name in sorted(stages):
        descends(name)

    for model, run in sorted(served.items()):
        gguf = run.get("gguf") if isinstance(run, dict) else None
        sha = gguf.get("sha256") if isinstance(gguf, dict) else None
        role = model if model in ("base", "plain") else "pruned"
        name = by_sha.get((role, str(sha)))
        where = f"eval/{model}/run.json"
        if name is None:
            chain.problems.append(f"{where}: the served GGUF has sha256 {sha}, which is no {role} GGUF of the manifest: "
                                  f"these samples do not descend from the {role} model's safetensors")
        elif name in stages and not chain.descends.get(name):
            chain.problems.append(f"{where}: served {name}, which does not descend from the {role} model's "
                                  "safetensors (see above)")
        else:
            chain.links += 1
    return chain


def _converted_from(name: str, role: str, record: Mapping[str, Any], published: Mapping[str, str],
                    base_files: Mapping[str, str] | None, chain: Chain) -> bool:
    sources = record.get("source_files")
    if not isinstance(sources, dict) or not sources:
        chain.problems.append(f"gguf:{name}.json: no source_files (sha256 of the safetensors it was converted "
                              "from; made by an older moeprune): rerun `invoke convert` and `invoke manifest`")
        return False
    if role == "base" and base_files is None:
        chain.notes.append(f"{name}: base checkpoint not given (--base): its source shards not compared")
        return True
    if role == "plain":  # the pruned checkpoint before recalibration: measured beside it, not published
        chain.notes.append(f"{name}: converted from the unpublished plain pruned checkpoint: its source shards not compared")
        return True
    truth, what = (published, "the published") if role == "pruned" else (base_files or {}, "the --base")
    wrong = []
    for file, sha in sorted(sources.items()):
        if truth.get(file) != sha:
            got = truth.get(file)
            wrong.append(f"{file} with sha256 {sha}, but {what} {file} " + (f"has {got}" if got else "does not exist"))
    shards = sorted(f for f in truth if "/" not in f and f.endswith(".safetensors"))
    missing = [f for f in shards if f not in sources]
    if missing:
        wrong.append(f"not from {what} shard(s) {', '.join(missing)}")
    if wrong:
        chain.problems.append(f"gguf:{name}: does not descend from {what} safetensors: converted from "
                              + "; ".join(wrong[:4]) + (f" and {len(wrong) - 4} more" if len(wrong) > 4 else ""))
        return False
    chain.links += 1
    return True


def _projector_of(name: str, record: Mapping[str, Any], published_tower: str | None,
                  base_files: Mapping[str, str] | None, chain: Chain) -> bool:
    """A projector serves the published model when it was converted from the tower the published
    checkpoint holds (and, given ``--base``, from the base's own files)."""
    tower = record.get("tower_sha256")
    if not tower:
        chain.problems.append(f"gguf:{name}.json: no tower_sha256 (the digest of the tower it was converted from)")
        return False
    if published_tower is None:
        chain.notes.append(f"{name}: the published checkpoint's tower not compared")
        return True
    if tower != published_tower:
        chain.problems.append(f"gguf:{name}: converted from a vision tower with digest {tower}, but the published "
                              f"checkpoint's tower has {published_tower}: this projector does not serve the model")
        return False
    if base_files is not None:
        return _converted_from(name, "base", record, {}, base_files, chain)
    chain.links += 1
    return True


__all__ = ["Chain", "chain_problems", "gguf_entries"]
