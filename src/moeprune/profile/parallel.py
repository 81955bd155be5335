"""Data-parallel profiling under ``torch.distributed``: who runs what, and how the sums meet.

``invoke profile`` is data-parallel when ``torchrun`` started it (``RANK``/``WORLD_SIZE`` in the
environment), or when the recipe asks for ``[profile] data_parallel = N`` and moeprune starts
``torchrun --standalone`` itself (:func:`launch`, loopback only). Each rank runs the one replay
executor on its share of the work:

- phase 1 splits the generation *batches* (the prompts, batched exactly as a single process batches
  them), so every prompt is generated with the same neighbours and padding as in a single run;
- phase 2 splits the replay batches (:func:`moeprune.profile.replay.make_batches`) the same way.
  A batch holds whole sequences, so the per-sequence statistic (``sequence_norm_sum``) is closed on
  the rank that replays the sequence.

Shares are strided (rank r takes batches r, r+N, ...): the batches are sorted by length, so a
contiguous split would give one rank all the long ones.

Every array of the replay's result is a float64 (or integer) sum over tokens or sequences; rank 0
gathers them in rank order and adds them (:func:`reduce_replay`), so a new statistic the recorder
keeps is reduced too, and the order of the additions is fixed. Integer counts are exact; a float64
sum differs from the single process's only by the order of its additions (the relative difference
is bounded by about ``batches * 2**-52``; the tests measure it). Rank 0 writes every output; the
other ranks write nothing. When moeprune launched the ranks itself, rank 0 writes the statistics and
the summary into the launcher's staging directory (``STAGING_ENV``), and the launcher moves them into
place only after every rank has ended well: a rank that dies after rank 0 wrote (while it leaves the
process group) still leaves nothing behind, so "nothing was written" is always true.

The world size is recorded in ``profile.json`` (``parallel``) but is not part of the profile
stage's cache key (``profile.data_parallel`` is excluded from the recipe's settings): runs at
different world sizes give the same statistics up to float64 summation order and the same keep
sets (the CI test checks both), so a profile made on 2 ranks serves a recipe run on 1 and the
reverse; which world made it stays visible in its provenance.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from moeprune.errors import MoepruneError

T = TypeVar("T")

# torchrun's own variables: a process that has them is one rank of a launched world.
RANK_ENV, WORLD_SIZE_ENV, LOCAL_RANK_ENV = "RANK", "WORLD_SIZE", "LOCAL_RANK"
# Set by :func:`launch`'s caller: the directory rank 0 writes the stage's final outputs into.
STAGING_ENV = "MOEPRUNE_PROFILE_STAGING"


class RankFailed(MoepruneError):
    """A rank of a data-parallel profile failed or vanished."""


@dataclass(frozen=True)
class World:
    """This process's place in the data-parallel profile (``size == 1``: a plain single process)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def share(self, items: Sequence[T]) -> list[T]:
        """This rank's items: every ``size``-th, from position ``rank`` (order kept)."""
        return list(items[self.rank :: self.size])

    def record(self, backend: str | None) -> dict[str, Any]:
        """What ``profile.json`` records of the world that produced it."""
        return {"world_size": self.size, "backend": backend}


def staging_dir(env: dict[str, str] | None = None) -> Path | None:
    """Where rank 0 writes the outputs the launcher commits (None: write them in place)."""
    value = (os.environ if env is None else env).get(STAGING_ENV)
    return Path(value) if value else None


def current_world(env: dict[str, str] | None = None) -> World:
    """The world torchrun describes in ``env`` (default: this process's), or a single process."""
    env = os.environ if env is None else env
    if WORLD_SIZE_ENV not in env:
        return World()
    try:
        world = World(int(env[RANK_ENV]), int(env[WORLD_SIZE_ENV]), int(env.get(LOCAL_RANK_ENV, env[RANK_ENV])))
    except (KeyError, ValueError):
        raise MoepruneError(
            f"${RANK_ENV}={env.get(RANK_ENV)!r}, ${WORLD_SIZE_ENV}={env.get(WORLD_SIZE_ENV)!r}: not a torchrun "
            "rank; launch with torchrun or unset them"
        ) from None
    if not 0 <= world.rank < world.size:
        raise MoepruneError(f"${RANK_ENV}={world.rank} is not in [0, ${WORLD_SIZE_ENV}={world.size})")
    return world


def backend_name() -> str:
    """NCCL for tensors where GPUs are present (gloo beside it for the CPU objects), gloo otherwise."""
    import torch

    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"


def rank_device_map(device_map: str, world: World) -> str:
    """The device_map of one rank: with GPUs and several ranks each rank takes its local GPU
    (``auto`` would spread every rank's model over all of them)."""
    import torch

    if world.size > 1 and torch.cuda.is_available() and device_map in ("auto", "cuda"):
        return f"cuda:{world.local_rank}"
    return device_map


class Collectives:
    """The object collectives of one world (a no-op world of one when ``size == 1``).

    Objects go through a gloo group on the CPU whatever the tensor backend. A peer that dies
    makes gloo raise; that becomes :class:`RankFailed`, one line, on the ranks still alive.
    """

    def __init__(self, world: World, group: Any = None) -> None:
        self.world = world
        self._group = group

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, group=self._group, **kwargs)
        except (RuntimeError, OSError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise RankFailed(
                f"data-parallel profile, rank {self.world.rank}: {what} failed because another rank "
                f"stopped ({first}); see that rank's error; nothing was written"
            ) from None

    def all_gather(self, value: T) -> list[T]:
        """Every rank's ``value``, in rank order, on every rank."""
        if self.world.size == 1:
            return [value]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world.size
        self._call("gathering the phase-1 sequences", dist.all_gather_object, out, value)
        return out

    def gather_to_root(self, value: T) -> list[T] | None:
        """Every rank's ``value`` in rank order on rank 0; None on the others."""
        if self.world.size == 1:
            return [value]
        import torch.distributed as dist

        out: list[Any] | None = [None] * self.world.size if self.world.is_root else None
        self._call("gathering the statistics", dist.gather_object, value, out, dst=0)
        return out

    def from_root(self, value: T) -> T:
        """Rank 0's ``value`` on every rank (also the barrier after rank 0 has written)."""
        if self.world.size == 1:
            return value
        import torch.distributed as dist

        box = [value if self.world.is_root else None]
        self._call("waiting for rank 0's outputs", dist.broadcast_object_list, box, src=0)
        return box[0]


@contextlib.contextmanager
def distributed(world: World) -> Iterator[tuple[Collectives, str | None]]:
    """Join the process group of ``world`` for the duration (nothing to join for one process).

    Yields the collectives and the backend's name (None for a single process)."""
    if world.size == 1:
        yield Collectives(world), None
        return
    import torch
    import torch.distributed as dist

    backend = backend_name()
    if torch.cuda.is_available():
        torch.cuda.set_device(world.local_rank)
    try:
        dist.init_process_group(backend=backend)
        objects = dist.new_group(backend="gloo") if "nccl" in backend else None
    except (RuntimeError, ValueError) as exc:
        raise RankFailed(f"data-parallel profile, rank {world.rank}: could not join the process group ({exc})") from None
    try:
        yield Collectives(world, objects), backend
    finally:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


# ReplayResult arrays that are a maximum over tokens: the ranks' are combined by max, not summed.
MAXIMA = frozenset({"max_activation_norm"})


def reduce_replay(parts: Sequence[Any]) -> Any:
    """One :class:`~moeprune.profile.replay.ReplayResult` from every rank's (in rank order).

    Every numpy array and every count is summed, in rank order (float64 stays float64, integers
    stay exact), except the maxima (``MAXIMA``), which take the largest rank's; ``domain_num_tokens`` per domain; ``elapsed_s`` is the slowest rank's. The other
    fields (layers, domains) must agree; the recorder is rank 0's own (its arrays are the share's)."""
    first = parts[0]
    merged: dict[str, Any] = {}
    for spec in dataclasses.fields(first):
        values = [getattr(part, spec.name) for part in parts]
        if spec.name in MAXIMA:
            merged[spec.name] = np.maximum.reduce(values)
        elif isinstance(values[0], np.ndarray):
            total = values[0].copy()
            for value in values[1:]:
                total += value
            merged[spec.name] = total
        elif spec.name == "elapsed_s":
            merged[spec.name] = max(values)
        elif spec.name == "num_sequences":
            merged[spec.name] = sum(values)
        elif spec.name == "domain_num_tokens":
            merged[spec.name] = {d: sum(v[d] for v in values) for d in values[0]}
        elif spec.name == "recorder":
            merged[spec.name] = values[0]
        else:
            if any(value != values[0] for value in values[1:]):
                raise RankFailed(f"data-parallel profile: the ranks disagree on {spec.name} ({values})")
            merged[spec.name] = values[0]
    return dataclasses.replace(first, **merged)


def check_share_sizes(num_batches: int, world: World, what: str) -> None:
    """Refuse more ranks than batches: a rank with nothing to do has no layer device to name."""
    if world.size > num_batches:
        raise MoepruneError(
            f"data-parallel profile: {world.size} ranks but only {num_batches} {what}; lower "
            "profile.data_parallel (or torchrun --nproc-per-node) or add calibration prompts"
        )


# --- launching ------------------------------------------------------------------------------------
def torchrun_command(nproc: int, task_argv: Sequence[str]) -> list[str]:
    """``torchrun --standalone`` (loopback rendezvous) running ``python -m invoke TASK_ARGV`` on
    ``nproc`` ranks, with this interpreter (so the venv's torch)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "--no-python", sys.executable, "-m", "invoke", *task_argv]


_ERROR_LINE = re.compile(r"^error: (.*)$", re.MULTILINE)
# A failure in torchrun's report: "  rank      : 1 (local_rank: 1)" then "  exitcode  : -9 (pid: 42)".
_FAILED_RANK = re.compile(r"^\s*rank\s*:\s*(\d+).*\n\s*exitcode\s*:\s*(-?\d+)", re.MULTILINE)


def failure_message(stderr: str, returncode: int) -> str:
    """One line for a failed launch: the first rank's own ``error:`` line, else which rank torchrun
    saw die and how (a killed rank prints nothing itself)."""
    errors = [line for line in _ERROR_LINE.findall(stderr) if "another rank stopped" not in line]
    if errors:
        return errors[0]
    # torchrun names the first failure it observed ("Root Cause"); the ranks it then stopped
    # (SIGTERM) or that failed because a peer vanished are listed before it, under "Failures".
    root_cause = stderr.rfind("Root Cause")
    died = _FAILED_RANK.search(stderr, root_cause if root_cause >= 0 else 0)
    if died:
        rank, code = died.groups()
        how = f"signal {-int(code)}" if int(code) < 0 else f"exit code {code}"
        return f"data-parallel profile: rank {rank} ended with {how}; nothing was written"
    return f"data-parallel profile: torchrun ended with exit code {returncode}; nothing was written"


def launch(nproc: int, task_argv: Sequence[str], cwd: Path, env: dict[str, str]) -> None:
    """Run ``invoke TASK_ARGV`` on ``nproc`` loopback ranks; raise RankFailed with one line if any fails.

    The ranks' stdout passes through (rank 0's summary); their stderr is kept and shown only
    when the launch fails, reduced to one line (torchrun's own report is many)."""
    result = subprocess.run(
        torchrun_command(nproc, task_argv), cwd=cwd, env={**os.environ, **env}, stderr=subprocess.PIPE, text=True
    )
    if result.returncode != 0:
        raise RankFailed(failure_message(result.stderr, result.returncode))
