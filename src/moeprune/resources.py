"""Where the project's data directories live: ``schemas/`` (every JSON Schema) and ``model_card/``
(the card templates and their assets).

Their single source is the repository's top level, where an auditor looks for them. A wheel
cannot ship files outside its package, so the build (``setup.py``) copies each of them, byte for
byte, into ``moeprune/_data/<name>/``; an installed moeprune reads those copies. A source checkout
(``pip install -e .``, or ``tasks.py`` putting ``src/`` on ``sys.path``, as in the image) reads the
top-level directory itself, so an edit there is seen at once and no stale copy can shadow it.

This module imports nothing of moeprune at load time: ``setup.py`` loads it by path for
:data:`DATA_DIRS` and :data:`PACKAGED_DATA`, before moeprune is installed.
"""

from __future__ import annotations

from pathlib import Path

# The top-level data directories, and where a build puts their copies inside the package.
DATA_DIRS = ("schemas", "model_card")
PACKAGED_DATA = "_data"


def checkout_root() -> Path | None:
    """The source checkout this module runs from, or None for an installed moeprune."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "pyproject.toml").is_file() and (root / "src" / "moeprune").is_dir() else None


def data_dir(name: str) -> Path:
    """The directory ``name`` (one of :data:`DATA_DIRS`) as a real path: the checkout's top-level
    one when running from a checkout, else the installed package's copy (jinja2, huggingface_hub
    and sha256 need files, not a zip member)."""
    if name not in DATA_DIRS:
        raise ValueError(f"{name!r} is not a data directory of moeprune ({', '.join(DATA_DIRS)})")
    root = checkout_root()
    candidates = [root / name] if root is not None else []
    candidates.append(Path(__file__).resolve().parent / PACKAGED_DATA / name)
    for path in candidates:
        if path.is_dir():
            return path
    from moeprune.errors import MoepruneError

    raise MoepruneError(f"{name}/ not found (looked in {' and '.join(map(str, candidates))}): restore it in "
                        "the checkout, or reinstall moeprune from a wheel or sdist")
