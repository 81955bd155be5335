"""Evaluation: lm-evaluation-harness against llama-server, results, error analysis, paired statistics.

- ``run_eval(recipe, layout) -> dict``: evaluate base and pruned GGUFs, write ``eval/results.json``
- ``recompute_results(eval_dir) -> dict``: every number of results.json from the sample logs
- ``check_results(eval_dir) -> list[str]``: differences between results.json and a recomputation
"""

from moeprune.eval.results import check_results, recompute_results, write_results
from moeprune.eval.run import EvalError, run_eval

__all__ = ["EvalError", "check_results", "recompute_results", "run_eval", "write_results"]
