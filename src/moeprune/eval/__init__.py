"""Evaluation: lm-evaluation-harness against llama-server, results, error analysis, paired statistics.

- ``run_eval(recipe, layout) -> dict``: evaluate base and pruned GGUFs, write ``eval/results.json``
- ``recompute_results(eval_dir) -> dict``: every number of results.json from the sample logs
- ``check_results(eval_dir) -> list[str]``: differences between results.json and a recomputation
"""


from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from moeprune.eval.results import check_results, recompute_results, write_results
    from moeprune.eval.failure import EvalError
    from moeprune.eval.run import run_eval

__all__ = ["EvalError", "check_results", "recompute_results", "run_eval", "write_results"]
_HOME = {"check_results": "results", "recompute_results": "results", "write_results": "results",
         "EvalError": "failure", "run_eval": "run"}


def __getattr__(name: str) -> Any:
    # Lazy: a reader of one constant (moeprune.eval.analysis.PRIMARY_FILTER) must not import the
    # whole harness driver.
    if name in _HOME:
        return getattr(importlib.import_module(f"moeprune.eval.{_HOME[name]}"), name)
    raise AttributeError(name)
