"""Tensor I/O: a lazy, validated safetensors checkpoint reader and an atomic sharded writer.

- :mod:`moeprune.io.checkpoint`: :class:`Checkpoint` (single file or shards + index, headers only,
  one shard open at a time, raw byte ranges) and :class:`TensorInfo`.
- :mod:`moeprune.io.writer`: :class:`ShardedWriter` (shards up to ``max_shard_bytes``, exact index,
  temporary directory renamed into place only on success).
- :mod:`moeprune.io.loading_plan` and :mod:`moeprune.io.materialize`: a transformers model built
  on ``meta`` and filled one module at a time from the shards, by transformers' own loading plan
  (imported on their own: they need torch and transformers).
"""

from __future__ import annotations

from moeprune.io.checkpoint import Checkpoint, CheckpointError, TensorInfo
from moeprune.io.writer import BytesSource, ShardedWriter, WriteError

__all__ = ["BytesSource", "Checkpoint", "CheckpointError", "ShardedWriter", "TensorInfo", "WriteError"]
