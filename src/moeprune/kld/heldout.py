"""The kld stage's held-out text: a local file (``kld.text``) or one pinned file of a Hub dataset
(``kld.source``).

A dataset file is downloaded only when the stage runs (``huggingface_hub``, at the recipe's
commit, through the HF cache), and must have the recipe's ``kld.source.file_sha256``: the sha256
the Hub itself lists for the file, so the pin can be checked without moeprune. Another file is
refused naming the field, and an unpinned source is refused once downloaded, with the value to pin,
so no published KL divergence is measured on a text nobody can rebuild. The text is the file's
column joined as is (no ``datasets`` builder in between), kept in the run's ``kld/`` under a name
carrying the file's sha256; kld.json records the text's own sha256.
"""

from __future__ import annotations

from pathlib import Path

from moeprune.atomic import write_text
from moeprune.errors import MoepruneError
from moeprune.hashing import sha256_file
from moeprune.kld.paths import kld_work_dir
from moeprune.layout import RunLayout
from moeprune.recipe import HeldOutSource, Recipe

FIELD = "kld.source.file_sha256"


class HeldOutTextError(MoepruneError):
    """The held-out text cannot be had, or is not the pinned one."""


def build_text(rows: list[str]) -> str:
    """The text of a split: its rows joined as they are (wikitext's rows end with their own newline)."""
    return "".join(rows)


def download(source: HeldOutSource) -> Path:
    """The dataset file at the pinned commit, from the HF cache or the Hub."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(source.dataset, source.file, repo_type="dataset", revision=source.revision))
    except Exception as exc:  # huggingface_hub raises many types (network, missing repo/file/revision)
        raise HeldOutTextError(f"kld.source: cannot download {source.describe()}: {type(exc).__name__}: "
                               f"{str(exc).splitlines()[0] if str(exc) else ''}") from None


def read_rows(path: Path, source: HeldOutSource) -> list[str]:
    """The file's ``column``, every row as a string (a null row is an empty one)."""
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow's errors for a file that is not parquet
        raise HeldOutTextError(f"kld.source.file = {source.file!r}: not a readable parquet file ({exc})") from None
    if source.column not in table.column_names:
        raise HeldOutTextError(f"kld.source.column = {source.column!r}: {source.describe()} has columns "
                               f"{', '.join(table.column_names)}")
    return ["" if row is None else str(row) for row in table.column(source.column).to_pylist()]


def check_pinned(source: HeldOutSource, sha256: str, size: int) -> None:
    if source.file_sha256 is None:
        raise HeldOutTextError(f"{FIELD} is not set: {source.describe()} has sha256 {sha256} ({size} bytes); "
                               "check it against the file's page on the Hub, pin it in the recipe's [kld.source] "
                               "and rerun")
    if sha256 != source.file_sha256:
        raise HeldOutTextError(f"{FIELD} = {source.file_sha256}, but {source.describe()} has sha256 {sha256} "
                               f"({size} bytes): not the pinned file; do not repin without reading why")


def source_text_path(recipe: Recipe, layout: RunLayout, file_sha256: str) -> Path:
    """Where the text built from a pinned file is kept: in the kld work directory, named by the file's sha256."""
    return kld_work_dir(recipe, layout) / f"heldout-{file_sha256[:16]}.txt"


def heldout_text(recipe: Recipe, layout: RunLayout) -> Path:
    """The held-out text file the stage scores: ``kld.text``, or ``kld.source`` fetched and checked."""
    source = recipe.kld.source
    if source is None:
        path = recipe.kld_text_path
        if path is None or not path.is_file():
            raise HeldOutTextError(f"kld.text = {recipe.kld.text!r}: file not found ({path})")
        return path
    path = download(source)
    sha256 = sha256_file(path)
    check_pinned(source, sha256, path.stat().st_size)
    text = build_text(read_rows(path, source))
    kept = source_text_path(recipe, layout, sha256)
    if not kept.is_file() or kept.read_text(encoding="utf-8") != text:
        write_text(kept, text)
    return kept


def source_record(recipe: Recipe) -> dict[str, str] | None:
    """What kld.json records of a ``kld.source`` (None for a local ``kld.text``): the pinned file."""
    source = recipe.kld.source
    if source is None or source.file_sha256 is None:
        return None
    return {"dataset": source.dataset, "revision": source.revision, "file": source.file,
            "file_sha256": source.file_sha256}


def describe_source(recipe: Recipe) -> str:
    """One line of ``invoke check``: whether KLD runs, and on which held-out text."""
    kld = recipe.kld
    if not kld.enabled:
        return "kld: disabled"
    if kld.source is None:
        return f"kld: enabled; held-out text {recipe.kld_text_path}"
    pin = (f"file sha256 {kld.source.file_sha256}" if kld.source.file_sha256 else
           f"file sha256 NOT PINNED ({FIELD} unset: the kld stage downloads the file, then refuses and prints the "
           "value to pin)")
    return f"kld: enabled; held-out text downloaded when the stage runs: {kld.source.describe()}, {pin}"
