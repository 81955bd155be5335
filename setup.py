"""Build hook: the wheel carries the top-level ``schemas/`` and ``model_card/``.

Everything else about the package is in pyproject.toml. Those two directories are the single
source (an auditor finds them at the repository's top level), and a wheel can only ship files
inside its package, so ``build_py`` copies each, byte for byte, to ``moeprune/_data/<name>/`` in
the build directory; :mod:`moeprune.resources` reads them there once installed. An sdist carries
the top-level directories (MANIFEST.in), so a wheel built from it makes the same copies.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def _resources():
    """moeprune/resources.py, loaded by path: the build must not import the package."""
    spec = importlib.util.spec_from_file_location("_moeprune_resources", ROOT / "src" / "moeprune" / "resources.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildPyWithData(build_py):
    """``build_py`` plus the copies of the top-level data directories."""

    def run(self) -> None:
        super().run()
        resources = _resources()
        for name in resources.DATA_DIRS:
            source = ROOT / name
            if not source.is_dir():
                raise SystemExit(f"{source}: missing; it is part of every moeprune build")
            target = Path(self.build_lib) / "moeprune" / resources.PACKAGED_DATA / name
            if target.exists():
                shutil.rmtree(target)  # a file deleted from the source must not survive in the build
            shutil.copytree(source, target, copy_function=shutil.copyfile)


setup(cmdclass={"build_py": BuildPyWithData})
