"""Data files shipped inside the package (JSON Schemas, card templates), found with
``importlib.resources`` so an installed wheel finds them as a source checkout does."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from moeprune.errors import MoepruneError


def package_dir(package: str) -> Path:
    """The directory of ``package``'s data files as a real path (jinja2, huggingface_hub and
    sha256 need files, not a zip member)."""
    root = resources.files(package)
    path = Path(str(root))
    if not path.is_dir():
        raise MoepruneError(f"{package}: data files are not on the file system ({root}); install moeprune "
                            "from a wheel or a source checkout, not a zip")
    return path
