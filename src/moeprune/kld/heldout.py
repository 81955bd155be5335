"""The kld stage's held-out text: a local file (``kld.text``) or a pinned Hub dataset (``kld.source``).

A dataset is fetched only when the stage runs (``datasets``, at the recipe's commit), built into
one text (the split's column joined as is), and kept in the run's ``kld/`` under a name carrying its
sha256. The text must have the recipe's ``kld.source.sha256``: another one (a moved dataset, another
builder) is refused naming the field, and an unpinned source is refused once built, with the value
to pin, so no published KL divergence is measured on a text nobody can rebuild.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from moeprune.atomic import write_text
from moeprune.errors import MoepruneError
from moeprune.kld.paths import kld_work_dir
from moeprune.layout import RunLayout
from moeprune.recipe import HeldOutSource, Recipe

FIELD = "kld.source.sha256"


class HeldOutTextError(MoepruneError):
    """The held-out text cannot be had, or is not the pinned one."""


def build_text(rows: list[str]) -> str:
    """The text of a split: its rows joined as they are (wikitext's rows end with their own newline)."""
    return "".join(rows)


def fetch_rows(source: HeldOutSource) -> list[str]:
    """The split's ``column`` at the pinned commit, read with ``datasets`` (a download on first use)."""
    import datasets

    try:
        split = datasets.load_dataset(source.dataset, source.config, split=source.split, revision=source.revision)
    except Exception as exc:  # datasets raises many types (network, missing config, hub errors)
        raise HeldOutTextError(f"kld.source: cannot load {source.describe()}: {type(exc).__name__}: {exc}") from None
    if source.column not in split.column_names:
        raise HeldOutTextError(f"kld.source.column = {source.column!r}: {source.describe()} has columns "
                               f"{', '.join(split.column_names)}")
    return [str(row) for row in split[source.column]]


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def source_text_path(recipe: Recipe, layout: RunLayout, sha256: str) -> Path:
    """Where a fetched text is kept: in the kld work directory, named by its sha256."""
    return kld_work_dir(recipe, layout) / f"heldout-{sha256[:16]}.txt"


def check_pinned(source: HeldOutSource, sha256: str, size: int) -> None:
    if source.sha256 is None:
        raise HeldOutTextError(f"{FIELD} is not set: the text built from {source.describe()} has sha256 {sha256} "
                               f"({size} bytes); check it, pin it in the recipe's [kld.source] and rerun")
    if sha256 != source.sha256:
        raise HeldOutTextError(f"{FIELD} = {source.sha256}, but the text built from {source.describe()} has "
                               f"sha256 {sha256} ({size} bytes): the dataset or its builder changed; do not "
                               "repin without reading why")


def heldout_text(recipe: Recipe, layout: RunLayout) -> Path:
    """The held-out text file the stage scores: ``kld.text``, or ``kld.source`` fetched and checked."""
    source = recipe.kld.source
    if source is None:
        path = recipe.kld_text_path
        if path is None or not path.is_file():
            raise HeldOutTextError(f"kld.text = {recipe.kld.text!r}: file not found ({path})")
        return path
    if source.sha256 is not None:
        kept = source_text_path(recipe, layout, source.sha256)
        if kept.is_file() and sha256_text(kept.read_text(encoding="utf-8")) == source.sha256:
            return kept
    text = build_text(fetch_rows(source))
    sha256 = sha256_text(text)
    check_pinned(source, sha256, len(text.encode("utf-8")))
    kept = source_text_path(recipe, layout, sha256)
    write_text(kept, text)
    return kept


def describe_source(recipe: Recipe) -> str:
    """One line of ``invoke check``: whether KLD runs, and on which held-out text."""
    kld = recipe.kld
    if not kld.enabled:
        return "kld: disabled"
    if kld.source is None:
        return f"kld: enabled; held-out text {recipe.kld_text_path}"
    pin = (f"sha256 {kld.source.sha256}" if kld.source.sha256 else
           f"sha256 NOT PINNED ({FIELD} unset: the kld stage fetches the text, then refuses and prints the value to pin)")
    return f"kld: enabled; held-out text fetched when the stage runs: {kld.source.describe()}, {pin}"
