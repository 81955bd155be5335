"""The whole-run plan: what each stage of a run will write to disk, hold in memory and (where an
earlier run measured it) take, computed from shapes before any stage runs.

- :mod:`moeprune.plan.ggml`: llama.cpp's type sizes and llama-quantize's per-tensor type rules
  (fallbacks included), as pure functions;
- :mod:`moeprune.plan.shapes`: a model's tensor shapes from its safetensors headers, or from a
  pinned shape summary shipped for a Hub base that is not downloaded;
- :mod:`moeprune.plan.disk`: the per-stage disk plan and the fit decision, pure;
- :mod:`moeprune.plan.gather`: the plan of a recipe's run directory (what exists, what will run,
  the free space), what ``invoke check`` and ``invoke reproduce`` print.
"""
