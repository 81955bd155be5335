"""Profile statistics: per (MoE layer, expert), overall and per domain; saved as safetensors.

File format (``runs/<name>/profile/stats.safetensors``, see team INTERFACES.md):

- ``contribution_sum`` float64 ``[layers, experts]``: sum over tokens of ||w_te * E_e(x_t)||_2
- ``routed_count``     int64: tokens routed to the expert
- ``reap_mean``        float64: contribution_sum / routed_count (0 where the count is 0)
- ``router_prob_sum``  float64: sum over tokens of the softmax router probability
- ``sequence_norm_sum`` float64: sum over sequences of sqrt(sum over the sequence's tokens of
  ||w_te * E_e(x_t)||_2^2), the seed's statistic (omnimergekit ``expert_contribution_v2.py``)
- the same five under ``domain/<domain>/`` for each calibration domain.

The maximum activation norm (:func:`max_activation_norm`) is not in this file (its bytes, and
with them every drop map's ``profile_stats_sha256``, stay what they were): ``profile.json``
records it as ``max_activation_norm``.

Metadata (str -> str): ``layers`` and ``domains`` (JSON lists), ``model_sha256``, ``num_tokens``,
plus ``domain_num_tokens`` (JSON object) and ``format_version``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from moeprune.atomic import atomic_file
from moeprune.errors import MoepruneError

STATS_FORMAT_VERSION = 2
STAT_NAMES = ("contribution_sum", "routed_count", "reap_mean", "router_prob_sum", "sequence_norm_sum")
# Absent from files written before format 2: such a file still loads (criterion
# 'sequence-norm-sum' then asks for a new profile).
OPTIONAL_STAT_NAMES = ("sequence_norm_sum",)


class StatsFileError(MoepruneError):
    """A statistics file that is missing or not in the expected format."""


@dataclass
class ProfileStats:
    """Expert statistics of one profiling run. Arrays are ``[num_moe_layers, num_experts]``."""

    layers: list[int]
    domains: list[str]
    totals: dict[str, np.ndarray]
    per_domain: dict[str, dict[str, np.ndarray]]
    model_sha256: str
    num_tokens: int
    domain_num_tokens: dict[str, int] = field(default_factory=dict)

    @property
    def num_experts(self) -> int:
        return int(self.totals["contribution_sum"].shape[1])


def reap_mean(contribution_sum: np.ndarray, routed_count: np.ndarray) -> np.ndarray:
    """Mean weighted norm over routed tokens (REAP's criterion); 0 where no token was routed."""
    counts = routed_count.astype(np.float64)
    return np.divide(contribution_sum, counts, out=np.zeros_like(contribution_sum, dtype=np.float64), where=counts > 0)


def max_activation_norm(per_domain_peaks: np.ndarray) -> np.ndarray:
    """Each expert's maximum activation norm, ``[layers, experts]`` float64, from ``[domains, layers, experts]``.

    The norm is the L-infinity norm (largest absolute element) of the expert's own output
    ``E_e(x_t)``, before the routing weight, and the maximum runs over every non-padding token
    routed to the expert in the profile (0 for an expert no token reached). It is the quantity
    the "super experts" of arXiv 2507.23279 are found by: a few experts produce the massive
    activations the model relies on, in a handful of tokens, so their summed contribution can be
    small while dropping them breaks the model (:func:`moeprune.dropmap.select.super_experts`).
    REAP records the same per-expert maximum of the unweighted output's elements (signed, in
    float32); the absolute value here also counts a massive negative activation. A maximum of
    exact values (bf16 outputs convert to float64 without rounding) is the same whatever the
    batching or replay order, so the whole and the streamed replay agree on it exactly.
    """
    peaks = np.asarray(per_domain_peaks, dtype=np.float64)
    if peaks.ndim != 3:
        raise ValueError(f"max activation norms: expected [domains, layers, experts], got shape {peaks.shape}")
    return peaks.max(axis=0)


def build_stats(
    *,
    layers: list[int],
    domains: list[str],
    contribution_sum: np.ndarray,
    routed_count: np.ndarray,
    router_prob_sum: np.ndarray,
    sequence_norm_sum: np.ndarray,
    domain_num_tokens: dict[str, int],
    model_sha256: str,
) -> ProfileStats:
    """Assemble :class:`ProfileStats` from per-domain accumulators of shape ``[domains, layers, experts]``.

    Totals are the sums over domains (every counted token belongs to exactly one domain).
    """
    contribution_sum = np.asarray(contribution_sum, dtype=np.float64)
    routed_count = np.asarray(routed_count, dtype=np.int64)
    router_prob_sum = np.asarray(router_prob_sum, dtype=np.float64)
    sequence_norm_sum = np.asarray(sequence_norm_sum, dtype=np.float64)
    expected = (len(domains), len(layers))
    for name, array in (("contribution_sum", contribution_sum), ("routed_count", routed_count),
                        ("router_prob_sum", router_prob_sum), ("sequence_norm_sum", sequence_norm_sum)):
        if array.ndim != 3 or array.shape[:2] != expected:
            raise ValueError(f"{name}: expected shape [{expected[0]}, {expected[1]}, experts], got {array.shape}")

    def five(contrib: np.ndarray, count: np.ndarray, prob: np.ndarray, seq_norm: np.ndarray) -> dict[str, np.ndarray]:
        return {
            "contribution_sum": contrib,
            "routed_count": count,
            "reap_mean": reap_mean(contrib, count),
            "router_prob_sum": prob,
            "sequence_norm_sum": seq_norm,
        }

    per_domain = {
        domain: five(contribution_sum[d], routed_count[d], router_prob_sum[d], sequence_norm_sum[d])
        for d, domain in enumerate(domains)
    }
    # Every sequence belongs to one domain, so the total is the sum over domains here too.
    totals = five(contribution_sum.sum(axis=0), routed_count.sum(axis=0), router_prob_sum.sum(axis=0),
                  sequence_norm_sum.sum(axis=0))
    return ProfileStats(
        layers=list(layers),
        domains=list(domains),
        totals=totals,
        per_domain=per_domain,
        model_sha256=model_sha256,
        num_tokens=int(sum(domain_num_tokens.values())),
        domain_num_tokens={d: int(domain_num_tokens.get(d, 0)) for d in domains},
    )


def stats_tensors(stats: ProfileStats) -> dict[str, np.ndarray]:
    """The flat name -> array mapping written to the safetensors file."""
    tensors: dict[str, np.ndarray] = {}
    for name in STAT_NAMES:
        tensors[name] = np.ascontiguousarray(stats.totals[name])
    for domain in stats.domains:
        for name in STAT_NAMES:
            tensors[f"domain/{domain}/{name}"] = np.ascontiguousarray(stats.per_domain[domain][name])
    return tensors


def save_stats(stats: ProfileStats, path: Path) -> None:
    """Write ``stats`` to ``path`` (safetensors, atomically)."""
    from safetensors.numpy import save

    metadata = {
        "format_version": str(STATS_FORMAT_VERSION),
        "layers": json.dumps(stats.layers),
        "domains": json.dumps(stats.domains),
        "model_sha256": stats.model_sha256,
        "num_tokens": str(stats.num_tokens),
        "domain_num_tokens": json.dumps(stats.domain_num_tokens, sort_keys=True),
    }
    payload = _canonical_header(save(stats_tensors(stats), metadata=metadata))
    with atomic_file(Path(path), mode="wb") as handle:
        handle.write(payload)


def _canonical_header(payload: bytes) -> bytes:
    """Rewrite a safetensors header with sorted keys, so equal statistics give equal file bytes.

    safetensors writes ``__metadata__`` in hash-map order, which changes between calls; the data
    offsets are relative to the end of the header, so only the header needs rewriting.
    """
    header_bytes = int.from_bytes(payload[:8], "little")
    header = json.loads(payload[8 : 8 + header_bytes])
    canonical = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    canonical += b" " * (-len(canonical) % 8)  # safetensors aligns the data to 8 bytes with spaces
    return len(canonical).to_bytes(8, "little") + canonical + payload[8 + header_bytes :]


def load_stats(path: str | Path) -> ProfileStats:
    """Read a statistics file written by :func:`save_stats`; raise StatsFileError naming what is wrong."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise StatsFileError(f"{path}: profile statistics not found; run `invoke profile` first")
    try:
        with safe_open(str(path), framework="numpy") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as exc:  # safetensors raises several exception types for a corrupt header
        raise StatsFileError(f"{path}: not a readable safetensors file ({exc}); rerun `invoke profile`") from None
    try:
        layers = [int(v) for v in json.loads(metadata["layers"])]
        domains = [str(v) for v in json.loads(metadata["domains"])]
        model_sha256 = metadata["model_sha256"]
        num_tokens = int(metadata["num_tokens"])
        domain_num_tokens = {k: int(v) for k, v in json.loads(metadata.get("domain_num_tokens", "{}")).items()}
    except (KeyError, ValueError, TypeError) as exc:
        raise StatsFileError(f"{path}: missing or malformed metadata ({exc!r}); rerun `invoke profile`") from None

    def take(prefix: str) -> dict[str, np.ndarray]:
        group = {}
        for name in STAT_NAMES:
            key = prefix + name
            if key not in tensors and name in OPTIONAL_STAT_NAMES:
                continue
            if key not in tensors:
                raise StatsFileError(f"{path}: tensor '{key}' missing; rerun `invoke profile`")
            array = tensors[key]
            if array.shape != (len(layers), array.shape[-1]) or array.ndim != 2:
                raise StatsFileError(f"{path}: tensor '{key}' has shape {array.shape}, expected [{len(layers)}, experts]")
            group[name] = array
        return group

    return ProfileStats(
        layers=layers,
        domains=domains,
        totals=take(""),
        per_domain={domain: take(f"domain/{domain}/") for domain in domains},
        model_sha256=model_sha256,
        num_tokens=num_tokens,
        domain_num_tokens=domain_num_tokens,
    )
