"""Drop map: which experts each MoE layer keeps (selection, file format, report, stage).

- :mod:`moeprune.dropmap.select`: pure selection over ``[layers, experts]`` arrays.
- :mod:`moeprune.dropmap.io`: the ``expert_drop_metadata.json`` format (build, write, load, check).
- :mod:`moeprune.dropmap.report`: the per-layer retention table.
- :mod:`moeprune.dropmap.stage`: :func:`run_dropmap`, the ``invoke dropmap`` stage.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from moeprune.dropmap.io import load_drop_map as load_drop_map
    from moeprune.dropmap.stage import run_dropmap as run_dropmap

__all__ = ["load_drop_map", "run_dropmap"]


def __getattr__(name: str) -> Any:
    # Lazy: importing the package must not pull in pydantic/rich for users of select only.
    if name == "load_drop_map":
        from moeprune.dropmap.io import load_drop_map

        return load_drop_map
    if name == "run_dropmap":
        from moeprune.dropmap.stage import run_dropmap

        return run_dropmap
    raise AttributeError(name)
