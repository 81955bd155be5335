"""Every number the model card shows, computed from artifacts, each with its source.

:func:`compute_card_numbers` returns a :class:`CardNumbers`: a flat ``{key: Number}`` map (value,
the exact text the card shows, and where it came from) plus the tables the template lays out,
which only refer to keys of that map. The card is rendered from it, ``card_numbers.json`` stores
it, and ``verify`` recomputes it from the published files and compares.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moeprune.arch.spec import CheckpointFacts
from moeprune.card.source import ArtifactSource
from moeprune.errors import MoepruneError
from moeprune.eval.analysis import PRIMARY_FILTER, PRIMARY_METRIC

# bytes per element of safetensors dtypes
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
DTYPE_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


class CardError(MoepruneError):
    """The card cannot be computed from the artifacts."""


@dataclass
class Number:
    value: Any
    display: str
    source: str

    def as_dict(self) -> dict[str, Any]:
        return {"value": self.value, "display": self.display, "source": self.source}


@dataclass
class CardNumbers:
    numbers: dict[str, Number] = field(default_factory=dict)
    tables: dict[str, Any] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)  # non-numeric context (names, versions)
    series: dict[str, Any] = field(default_factory=dict)  # arrays for the plots
    wording: dict[str, str] = field(default_factory=dict)  # the family's names for the card text (not numbers)
    not_rederived: list[str] = field(default_factory=list)  # GGUF files whose numbers were taken as stated

    def add(self, key: str, value: Any, display: str, source: str) -> str:
        if key in self.numbers:
            raise AssertionError(f"card number '{key}' set twice")
        if isinstance(value, (np.integer,)):
            value = int(value)
        elif isinstance(value, (np.floating,)):
            value = float(value)
        self.numbers[key] = Number(value, display, source)
        return key

    def display(self) -> dict[str, str]:
        return {key: number.display for key, number in self.numbers.items()}

    def as_json(self) -> dict[str, Any]:
        return {key: self.numbers[key].as_dict() for key in sorted(self.numbers)}


# --- formatting ---------------------------------------------------------------------------------
def fmt_pct(fraction: float, digits: int = 2) -> str:
    return f"{100 * fraction:.{digits}f}%"


def fmt_signed_pct(fraction: float, digits: int = 1) -> str:
    return f"{100 * fraction:+.{digits}f}%".replace("-", "−")


def fmt_pp(difference: float, digits: int = 2) -> str:
    return f"{100 * difference:+.{digits}f} pp".replace("-", "−")


def fmt_count(value: float, unit: str = "") -> str:
    """3 significant figures with K/M/B/T (decimal), e.g. 22.4B, 1.23M, 512."""
    value = float(value)
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= scale:
            scaled = value / scale
            digits = max(0, 2 - int(math.floor(math.log10(abs(scaled)))))
            return f"{scaled:.{digits}f}{suffix}{unit}"
    return f"{value:.0f}{unit}"


def fmt_bytes(size_bytes: int) -> str:
    """Decimal units as on the Hub: 14.0 GB, 3.21 MB."""
    value = float(size_bytes)
    for scale, suffix in ((1e12, " TB"), (1e9, " GB"), (1e6, " MB"), (1e3, " kB")):
        if value >= scale:
            scaled = value / scale
            digits = max(0, 2 - int(math.floor(math.log10(scaled))))
            return f"{scaled:.{digits}f}{suffix}"
    return f"{int(value)} B"


def fmt_int(value: int) -> str:
    return f"{int(value):,}"


def fmt_p(value: float) -> str:
    return f"{value:.3g}" if value >= 1e-4 else f"{value:.1e}"


# --- checkpoint facts -----------------------------------------------------------------------------
def checkpoint_facts(model_dir: Path) -> CheckpointFacts:
    """Parameter and byte counts from the safetensors headers (no tensor is read): the model's
    :class:`~moeprune.arch.ModelSpec` says, its adapter telling which tensors are indexed by expert."""
    from moeprune.arch import ArchError, inspect

    try:
        return inspect(model_dir).checkpoint
    except ArchError as exc:
        raise CardError(str(exc)) from None


RESULTS = "eval/results.json"  # the source named by every eval number


# --- the card numbers -------------------------------------------------------------------------------
@dataclass(frozen=True)
class CardInputs:
    """What every section of the card reads: the artifacts, the eval results, the stored card
    numbers (verify only) and the two things read once for all sections (model spec, drop map)."""

    source: ArtifactSource
    results: dict[str, Any]
    stated: dict[str, Any] | None
    spec: Any  # moeprune.arch.ModelSpec of the pruned checkpoint
    drop_map: dict[str, Any]

    @property
    def recipe(self) -> dict[str, Any]:
        return self.source.recipe

    @property
    def drop_map_name(self) -> str:
        return self.source.drop_map_path.name

    @functools.cached_property
    def stats(self) -> Any:
        """``profile/stats.safetensors``, read once for the sections that need it."""
        from moeprune.profile.stats import load_stats

        return load_stats(self.source.stats_path)


def compute_card_numbers(source: ArtifactSource, results: dict[str, Any],
                         stated: dict[str, Any] | None = None) -> CardNumbers:
    """Compute every number of the card from the artifacts in ``source`` and eval ``results``.

    ``results`` is ``eval/results.json`` (rendering) or its recomputation from the sample logs
    (verification): the card numbers follow whichever is given. ``stated`` (verify: the stored
    ``card_numbers.json``) supplies the bits per weight of a GGUF file that is not at hand (a Hub
    artifact's GGUF repository is not downloaded; its fallbacks are still counted from the
    downloaded record); each such file is named in :attr:`CardNumbers.not_rederived`. Without it, a
    GGUF not at hand is an error.

    Each section of the card is one function of :data:`SECTIONS`, run in order (a section may
    read a number an earlier one added); adding a section is adding one function there.
    """
    from moeprune.arch import ArchError, inspect
    from moeprune.dropmap.io import load_drop_map

    try:
        spec = inspect(source.model_dir)
    except ArchError as exc:
        raise CardError(str(exc)) from None
    inputs = CardInputs(source, results, stated, spec, load_drop_map(source.drop_map_path))
    card = CardNumbers()
    for section in SECTIONS:
        section(card, inputs)
    return card


def _size_numbers(card: CardNumbers, inputs: CardInputs) -> None:
    """Parameters and sizes: the pruned model's from its headers, the base's = pruned + the dropped
    experts' share."""
    source, drop_map = inputs.source, inputs.drop_map
    pruned = inputs.spec.checkpoint
    dropped_by_layer = {entry["layer"]: len(entry["drop"]) for entry in drop_map["layers"]}
    missing = sorted(set(dropped_by_layer) - set(pruned.expert_params_per_layer))
    if missing:
        raise CardError(f"{source.drop_map_path}: layers {missing} have no expert tensors in {source.model_dir}")
    base_params = pruned.params + sum(n * pruned.expert_params_per_layer[l] for l, n in dropped_by_layer.items())
    base_bytes = pruned.tensor_bytes + sum(n * pruned.expert_bytes_per_layer[l] for l, n in dropped_by_layer.items())
    header_src = "safetensors headers of the pruned shards"
    derived_src = f"{header_src} + dropped experts in {inputs.drop_map_name}"
    card.add("params.base", base_params, fmt_count(base_params), derived_src)
    card.add("params.pruned", pruned.params, fmt_count(pruned.params), header_src)
    card.add("params.delta", pruned.params / base_params - 1, fmt_signed_pct(pruned.params / base_params - 1, 1),
             "params.pruned / params.base - 1")
    card.add("weights.base_bytes", base_bytes, fmt_bytes(base_bytes), derived_src)
    card.add("weights.pruned_bytes", pruned.tensor_bytes, fmt_bytes(pruned.tensor_bytes), header_src)
    card.add("weights.delta", pruned.tensor_bytes / base_bytes - 1,
             fmt_signed_pct(pruned.tensor_bytes / base_bytes - 1, 1), "weights.pruned_bytes / weights.base_bytes - 1")
    card.add("weights.shards", pruned.shards, str(pruned.shards), "model.safetensors.index.json")
    card.facts["dtype"] = DTYPE_NAMES.get(pruned.dtype, pruned.dtype.lower())


def _expert_numbers(card: CardNumbers, inputs: CardInputs) -> None:
    """Experts per layer before and after, as the drop map and config.json state them, and top-k."""
    drop_map, spec, name = inputs.drop_map, inputs.spec, inputs.drop_map_name
    num_experts = int(drop_map["num_experts"])
    kept_counts = sorted({len(entry["keep"]) for entry in drop_map["layers"]})
    kept_display = str(kept_counts[0]) if len(kept_counts) == 1 else f"{kept_counts[0]}–{kept_counts[-1]}"
    card.add("experts.base", num_experts, str(num_experts), f"{name}: num_experts")
    card.add("experts.pruned", kept_counts[0] if len(kept_counts) == 1 else kept_counts,
             kept_display, f"{name}: layers[].keep")
    dropped = num_experts - kept_counts[0] if len(kept_counts) == 1 else None
    card.add("experts.dropped_per_layer", dropped, f"−{dropped}/layer" if dropped is not None else "varies",
             "experts.base - experts.pruned")
    config_experts = spec.num_experts
    card.add("experts.config", config_experts, str(config_experts), f"config.json: {spec.num_experts_key}")
    card.add("top_k", int(drop_map["top_k"]), str(drop_map["top_k"]), f"{name}: top_k")


def _arch_numbers(card: CardNumbers, inputs: CardInputs) -> None:
    """The architecture (config.json through the model spec) and the family's wording."""
    spec = inputs.spec
    arch = spec.adapter
    layer_types = spec.layer_types
    num_layers, hidden = spec.required_int("num_hidden_layers"), spec.required_int("hidden_size")
    card.add("arch.layers", num_layers, str(num_layers), "config.json")
    card.add("arch.hidden", hidden, fmt_int(hidden), "config.json")
    expert_key = arch.expert_intermediate_key
    expert_size = spec.required_int(expert_key)
    card.add("arch.expert_intermediate", expert_size, fmt_int(expert_size), f"config.json: {expert_key}")
    dense_key = arch.dense_intermediate_key
    dense_size = spec.text_int(dense_key)
    if dense_size is not None:
        card.add("arch.dense_intermediate", dense_size, fmt_int(dense_size), f"config.json: {dense_key}")
    card.wording.update(family=arch.family, router_sentence=arch.router_sentence,
                        num_experts_key=spec.num_experts_key)
    vocab = spec.required_int("vocab_size")
    card.add("arch.vocab", vocab, fmt_int(vocab), "config.json: vocab_size")
    if layer_types:  # families without per-layer attention types get no attention line
        sliding = sum(1 for t in layer_types if t == "sliding_attention")
        full = sum(1 for t in layer_types if t == "full_attention")
        card.add("arch.sliding_layers", sliding, str(sliding), "config.json: layer_types")
        card.add("arch.full_layers", full, str(full), "config.json: layer_types")
    moe_layers = len(inputs.drop_map["layers"])
    card.add("arch.moe_layers", moe_layers, str(moe_layers), f"{inputs.drop_map_name}: layers")


def _retention_numbers(card: CardNumbers, inputs: CardInputs) -> None:
    """The pruning decision: strategy, threshold and each layer's retained fraction (a table in
    three columns and the plot's series)."""
    drop_map, name = inputs.drop_map, inputs.drop_map_name
    threshold = drop_map["strategy"].get("retention_threshold")
    card.facts["strategy"] = drop_map["strategy"]["name"]
    card.facts["criterion"] = drop_map["strategy"]["criterion"]
    # Which profile statistic the retention (and the threshold) was measured on.
    card.facts["retention_measure"] = (drop_map.get("summary") or {}).get("retention_measure", "contribution_sum")
    if threshold is not None:
        card.add("dropmap.threshold", threshold, fmt_pct(threshold, 0 if threshold * 100 == int(threshold * 100) else 2),
                 f"{name}: strategy.retention_threshold")
    rows = []
    fractions = []
    for entry in drop_map["layers"]:
        layer = entry["layer"]
        fraction = entry["retained_fraction"]
        fractions.append(fraction)
        key = card.add(f"retention.L{layer}", fraction, fmt_pct(fraction), f"{name}: layers[{layer}]")
        rows.append((f"L{layer}", key))
    worst = int(np.argmin(fractions))
    worst_layer = drop_map["layers"][worst]["layer"]
    card.add("retention.worst_layer", worst_layer, str(worst_layer), "argmin of retained_fraction")
    card.add("retention.worst", fractions[worst], fmt_pct(fractions[worst]), "min of retained_fraction")
    columns = 3
    per_column = math.ceil(len(rows) / columns)
    card.tables["retention"] = [
        [rows[c * per_column + r] if c * per_column + r < len(rows) else None for c in range(columns)]
        for r in range(per_column)
    ]
    card.series["retention"] = {"layers": [e["layer"] for e in drop_map["layers"]], "fractions": fractions,
                                "threshold": threshold}


def _calibration_numbers(card: CardNumbers, inputs: CardInputs) -> None:
    """What the profile measured on: tokens and domains (stats.safetensors), the recipe's prompts
    and generation budget, and how phases 1 and 2 ran."""
    source, recipe, stats = inputs.source, inputs.recipe, inputs.stats
    card.add("calib.tokens", int(stats.num_tokens), fmt_int(stats.num_tokens), "profile/stats.safetensors: num_tokens")
    card.add("calib.domains", len(stats.domains), str(len(stats.domains)), "profile/stats.safetensors: domains")
    card.facts["domains"] = list(stats.domains)
    calibration = recipe.get("calibration", {})
    if calibration:
        per = int(calibration["prompts_per_domain"])
        card.add("calib.prompts_per_domain", per, str(per), "recipe: calibration.prompts_per_domain")
        card.add("calib.prompts", per * len(stats.domains), str(per * len(stats.domains)),
                 "calib.prompts_per_domain × calib.domains")
        card.add("calib.max_new_tokens", int(calibration["max_new_tokens"]), fmt_int(calibration["max_new_tokens"]),
                 "recipe: calibration.max_new_tokens")
        card.facts["thinking"] = bool(recipe_setting(recipe, "calibration", "enable_thinking"))
    _phase1_facts(card, source, recipe.get("profile", {}))


def _findings_numbers(card: CardNumbers, inputs: CardInputs) -> None:
    """The profile's findings (moeprune.profile.findings with the recipe's k and coverage):
    concentration, Gini, the most and least concentrated layers, the most distinct domain pair."""
    from moeprune.profile.findings import compute_findings, gini

    recipe, stats = inputs.recipe, inputs.stats
    contribution = stats.totals["contribution_sum"]
    overlap_k = int(recipe_setting(recipe, "profile", "top_overlap_k"))
    share_k = int(recipe_setting(recipe, "profile", "top_share_k"))
    coverage = float(recipe_setting(recipe, "profile", "coverage_fraction"))
    per_domain = {d: stats.per_domain[d]["contribution_sum"] for d in stats.domains}
    findings = compute_findings(contribution, list(stats.layers), per_domain, overlap_k=overlap_k,
                                share_k=share_k, coverage_fraction=coverage)
    stats_src = "profile/stats.safetensors: contribution_sum"
    card.add("find.share_k", findings["top_share_k"], str(findings["top_share_k"]), "recipe: profile.top_share_k")
    card.add("find.top_share", findings["top_k_share_pooled"], fmt_pct(findings["top_k_share_pooled"], 1), stats_src)
    card.add("find.coverage", coverage, fmt_pct(coverage, 0), "recipe: profile.coverage_fraction")
    card.add("find.coverage_experts", findings["experts_to_coverage_mean"],
             f"{findings['experts_to_coverage_mean']:.1f}", stats_src)
    card.add("find.gini", findings["gini_mean"], f"{findings['gini_mean']:.2f}", stats_src)
    card.add("find.gini_min", findings["gini_min"], f"{findings['gini_min']:.2f}", stats_src)
    card.add("find.gini_max", findings["gini_max"], f"{findings['gini_max']:.2f}", stats_src)
    most = findings["most_concentrated_layers"][0]
    least = findings["least_concentrated_layers"][0]
    card.add("find.most_layer", most["layer"], str(most["layer"]), stats_src)
    card.add("find.most_top1", most["top1_share"], fmt_pct(most["top1_share"], 1), stats_src)
    card.add("find.least_layer", least["layer"], str(least["layer"]), stats_src)
    card.add("find.least_topk", least["top_k_share"], fmt_pct(least["top_k_share"], 1), stats_src)
    half = contribution.shape[1] // 2
    position = list(stats.layers).index(most["layer"])
    row = np.sort(np.asarray(contribution[position], dtype=np.float64))
    bottom = float(row[:half].sum() / row.sum()) if row.sum() > 0 else 0.0
    card.add("find.bottom_n", half, str(half), "num_experts // 2")
    card.add("find.bottom_share", bottom, fmt_pct(bottom, 1), stats_src)
    overlaps = findings["domain_overlap"]
    if overlaps:
        pick = min(overlaps, key=lambda o: o["mean"])  # the most distinct pair of the recipe's domains
        card.facts["overlap_domains"] = pick["domains"]
        card.add("find.overlap_k", pick["k"], str(pick["k"]), "recipe: profile.top_overlap_k")
        card.add("find.overlap_mean", pick["mean"], f"{pick['mean']:.1f}", stats_src + " per domain")
        card.add("find.overlap_min", pick["min"], str(pick["min"]), stats_src + " per domain")
    ordered = -np.sort(-np.asarray(contribution, dtype=np.float64), axis=1)
    totals = ordered.sum(axis=1, keepdims=True)
    card.series["concentration"] = {
        "layers": list(stats.layers),
        "cumulative": np.divide(np.cumsum(ordered, axis=1), totals, out=np.zeros_like(ordered), where=totals > 0).tolist(),
    }
    card.series["gini"] = {"layers": list(stats.layers), "gini": gini(contribution).tolist()}


def fallback_key(name: str, requested: str, actual: str) -> str:
    """The card number of how many tensors of GGUF ``name`` fell back from ``requested`` to ``actual``."""
    return f"gguf.fallback.{name}.{requested}->{actual}"


def _gguf_bits_numbers(card: CardNumbers, inputs: CardInputs) -> None:
    """Effective bits per weight of every published GGUF and of both evaluated ones, and the tensors
    llama-quantize gave another type, counted per (requested, actual) type (:mod:`moeprune.gguf_bits`)."""
    from moeprune.gguf_bits import fallback_counts, read_gguf_bits

    source, results, stated = inputs.source, inputs.results, inputs.stated

    evaluated = {}
    for model in ("base", "pruned"):
        entry = results["models"].get(model)
        located = source.gguf_by_sha256(entry["gguf"]["sha256"]) if entry else None
        if located is not None:
            evaluated[model] = located[0]
    names = sorted(name for name, entry in source.gguf_files.items() if entry["published"] or name in evaluated.values())
    rows: dict[str, Any] = {}
    for name in names:
        path = source.gguf_at_hand(name)
        bits = read_gguf_bits(path, f"gguf/{name}") if path is not None else None
        if bits is not None:
            bpw = card.add(f"gguf.bpw.{name}", bits.bits_per_weight, f"{bits.bits_per_weight:.2f}",
                           f"gguf/{name}: tensor bytes × 8 / {bits.weights} weights")
        else:  # a Hub artifact's GGUF repository is not downloaded: the bits per weight as stated
            bpw = f"gguf.bpw.{name}"
            number = (stated or {}).get("numbers", {}).get(bpw)
            if stated is None or not isinstance(number, dict):
                raise CardError(f"gguf/{name}: not found, and no stated '{bpw}'; the card reads it from the file itself")
            card.add(bpw, number.get("value"), number.get("display"), f"as stated: gguf/{name} not at hand")
            card.not_rederived.append(name)
        record_path = source.gguf_dir / f"{name}.json" if source.gguf_dir is not None else None
        record = (json.loads(record_path.read_text(encoding="utf-8"))
                  if record_path is not None and record_path.is_file() else {})
        fallbacks = []
        if record.get("stage") == "quantize":
            if "fallbacks" not in record:
                raise CardError(f"gguf/{record_path.name}: a quantize record without 'fallbacks'; re-run `invoke quantize`")
            counts = fallback_counts(record["fallbacks"]["tensors"], bits, f"gguf/{name}")
            checked = f", checked against gguf/{name}" if bits is not None else ""
            for (requested, actual), count in counts.items():
                key = card.add(fallback_key(name, requested, actual), count, str(count),
                               f"gguf/{record_path.name}: fallbacks{checked}")
                fallbacks.append({"requested": requested, "actual": actual, "key": key})
        elif bits is None and not record:  # neither the file nor its record (the unpublished base's) is here
            for row in ((stated or {}).get("tables", {}).get("gguf_bits") or {}).get(name, {}).get("fallbacks", []):
                number = stated["numbers"].get(row["key"])
                if not isinstance(number, dict):
                    raise CardError(f"card_numbers.json: '{row['key']}' is missing")
                card.add(row["key"], number.get("value"), number.get("display"), f"as stated: gguf/{name} not at hand")
                fallbacks.append(row)
        rows[name] = {"bpw": bpw, "fallbacks": fallbacks}
    card.tables["gguf_bits"] = rows
    card.tables["eval_gguf_bits"] = {model: rows[name]["bpw"] for model, name in evaluated.items() if name in rows}


_KLD_ROLE_NAMES = {
    "reference": "base {q}: the reference against itself",
    "pruned-converted": "pruned {q} (pruning alone)",
    "base-eval": "base {q} (quantization alone)",
    "pruned-eval": "**pruned {q} (this model)**",
    "pruned-quant": "pruned {q}",
    "base-candidate": "base {q}",
    "plain-eval": "plain pruned {q} (before recalibration)",
}
# With a plain-eval row the pruned rows are the recalibrated checkpoint's: named so beside it.
_KLD_RECALIBRATED_NAMES = {
    "pruned-converted": "pruned + recalibrated {q}",
    "pruned-eval": "**pruned + recalibrated {q} (this model)**",
    "pruned-quant": "pruned + recalibrated {q}",
}
_KLD_ORDER = ("reference", "pruned-converted", "base-eval", "plain-eval", "pruned-eval", "pruned-quant", "base-candidate")


def _kld_numbers(card: CardNumbers, inputs: CardInputs) -> None:
    """The KLD table, the equal-size comparison and the plot series, from ``eval/kld.json``."""
    from moeprune.kld.report import load_kld

    kld = load_kld(inputs.source.eval_dir / "kld.json")
    card.tables["kld"] = []
    if kld is None or not kld["enabled"]:
        return
    src = "eval/kld.json"
    rows = sorted(kld["rows"], key=lambda r: (_KLD_ORDER.index(r["role"]), -r["gguf"]["size_bytes"]))
    rival = kld["rival"]
    reference = kld["reference"]
    card.facts["kld_text"] = kld["text"]["file"]
    card.facts["kld_reference"] = reference["label"].replace("base-", "", 1)
    card.add("kld.tokens", rows[0]["scored_tokens"], fmt_int(rows[0]["scored_tokens"]), f"{src}: rows[].scored_tokens")
    card.add("kld.chunks", reference["chunks"], fmt_int(reference["chunks"]), f"{src}: reference.chunks")
    card.add("kld.ctx_size", reference["ctx_size"], fmt_int(reference["ctx_size"]), f"{src}: reference.ctx_size")
    card.add("kld.reference_ppl", reference["ppl"], f"{reference['ppl']:.2f}", f"{src}: reference.ppl")
    names = _KLD_ROLE_NAMES | (_KLD_RECALIBRATED_NAMES if any(r["role"] == "plain-eval" for r in rows) else {})
    table = []
    for row in rows:
        key = f"kld.{row['label']}"
        where = f"{src}: rows[{row['label']}]"
        kl, top1 = row["mean_kld"], row["top1_agreement"]
        card.add(f"{key}.size", row["gguf"]["size_bytes"], fmt_bytes(row["gguf"]["size_bytes"]), f"{where}.gguf.size_bytes")
        # + 0.0: the reference against itself reads 0.0000, not -0.0000
        card.add(f"{key}.kld", kl["value"], f"{kl['value'] + 0.0:.4f} ± {kl['stderr']:.4f}", f"{where}.mean_kld")
        card.add(f"{key}.top1", top1["value"], f"{100 * top1['value']:.2f}% ± {100 * top1['stderr']:.2f}%",
                 f"{where}.top1_agreement")
        card.add(f"{key}.ppl_ratio", row["ppl_ratio"], f"{row['ppl_ratio']:.4f}", f"{where}.ppl_ratio")
        name = names[row["role"]].format(q=row["quant_type"])
        if row["label"] == rival["label"]:
            name = f"**{name} (equal-size rival)**"
        table.append({"name": name, "key": key})
    card.tables["kld"] = table
    card.facts["kld_rival"] = rival["quant_type"]
    card.add("kld.rival_size_delta", rival["size_difference_fraction"], fmt_signed_pct(rival["size_difference_fraction"], 1),
             f"{src}: rival.size_difference_fraction")
    by_label = {row["label"]: row for row in kld["rows"]}
    pruned, rival_row = by_label[rival["pruned_label"]], by_label[rival["label"]]
    gap = pruned["mean_kld"]["value"] - rival_row["mean_kld"]["value"]
    spread = math.hypot(pruned["mean_kld"]["stderr"], rival_row["mean_kld"]["stderr"])
    card.add("kld.equal_size_gap", gap, f"{gap:+.4f}".replace("-", "−"), "pruned - rival mean KLD")
    sigmas = abs(gap) / spread if spread > 0 else math.inf
    card.add("kld.equal_size_sigmas", sigmas, f"{sigmas:.1f}", "|gap| / combined uncertainty")
    closer = ("the pruned model is closer to the base than the base quantized harder" if gap < 0 else
              f"the base quantized to {rival['quant_type']} is closer to the base than the pruned model")
    card.facts["kld_verdict"] = (closer + ("" if sigmas >= 2 else
                                 ", but by less than two combined uncertainties (not a clear difference)"))
    card.series["kld"] = {
        "points": [{"label": row["label"], "model": row["model"], "role": row["role"], "quant_type": row["quant_type"],
                    "size_bytes": row["gguf"]["size_bytes"], "kld": row["mean_kld"]["value"],
                    "stderr": row["mean_kld"]["stderr"]} for row in rows if row["role"] != "reference"],
        "rival": rival["label"],
        "pruned": rival["pruned_label"],
    }


def _phase1_facts(card: CardNumbers, source: ArtifactSource, profile_cfg: dict[str, Any]) -> None:
    """Which generator wrote the phase-1 sequences (profile.json's record, else the recipe) and how
    phase 2 replayed them."""
    summary_path = source.stats_path.parent / "profile.json"
    generator = None
    if summary_path.is_file():
        generator = json.loads(summary_path.read_text(encoding="utf-8")).get("phase1", {}).get("generator")
    if generator is None and profile_cfg.get("generate") == "llama-server" and profile_cfg.get("generate_gguf"):
        generator = {"name": "llama-server", "gguf": Path(profile_cfg["generate_gguf"]).name}
    if generator and generator.get("name") == "llama-server":
        card.facts["phase1_gguf"] = generator.get("gguf")
        card.facts["phase1_gguf_sha256"] = generator.get("gguf_sha256")
    card.facts["replay_streamed"] = profile_cfg.get("replay") == "streamed"


def _score(results: dict[str, Any], model: str, task: str, filter_name: str) -> dict[str, Any] | None:
    scores = results["models"].get(model, {}).get("tasks", {}).get(task, {}).get("scores", {})
    return scores.get(filter_name, {}).get(PRIMARY_METRIC)


def recipe_setting(recipe: dict[str, Any], section: str, name: str) -> Any:
    """``<section>.<name>`` of the recorded recipe; for an artifact recorded without it, the field's
    default read from its one definition (the typed recipe model), never a copy of it."""
    from moeprune.recipe import Recipe

    values = recipe.get(section) or {}
    if name in values:
        return values[name]
    return Recipe.model_fields[section].annotation.model_fields[name].default


def _evaluated_models(results: dict[str, Any]) -> list[str]:
    """In the card's order: base, the plain pruned model (a recalibrated run's), the published one."""
    return [m for m in ("base", "plain", "pruned") if m in results["models"]]


def _eval_setting_numbers(card: CardNumbers, inputs: CardInputs) -> None:
    """How both models were evaluated: the tasks, lm-eval's settings, the server's, the tools."""
    results, recipe = inputs.results, inputs.recipe
    models = _evaluated_models(results)
    tasks = list(results["settings"]["tasks"])
    card.facts["task"] = tasks[0]
    card.facts["tasks"] = tasks
    card.facts["models"] = models
    settings = results["settings"]
    card.add("eval.max_gen_toks", settings["max_gen_toks"], fmt_int(settings["max_gen_toks"]), f"{RESULTS}: settings")
    card.add("eval.temperature", settings["temperature"], f"{settings['temperature']:g}", f"{RESULTS}: settings")
    card.add("eval.seed", settings["seed"], str(settings["seed"]), f"{RESULTS}: settings")
    card.add("eval.bootstrap_resamples", settings["bootstrap_resamples"], fmt_int(settings["bootstrap_resamples"]),
             f"{RESULTS}: settings")
    serve = recipe.get("serve", {})
    if serve:
        card.add("serve.ctx_size", serve["ctx_size"], fmt_int(serve["ctx_size"]), "recipe: serve.ctx_size")
        budget = serve["reasoning_budget"]
        card.add("serve.reasoning_budget", budget, "unlimited" if budget < 0 else f"{fmt_int(budget)} tokens",
                 "recipe: serve.reasoning_budget")
        card.add("serve.n_gpu_layers", serve["n_gpu_layers"], str(serve["n_gpu_layers"]), "recipe: serve.n_gpu_layers")
        card.facts["reasoning_format"] = serve["reasoning_format"]
    first = results["models"][models[0]]
    card.facts["lm_eval_version"] = first["lm_eval"]["version"]
    card.facts["quant_type"] = first["gguf"]["quant_type"]
    build = first.get("llamacpp_build") or {}
    src = build.get("source") or {}
    card.facts["llamacpp"] = (src.get("llama_cpp_commit") or src.get("version") or build.get("key") or "unknown")
    workers = (first.get("topology") or {}).get("rpc_workers") or []
    card.facts["rpc_workers"] = len(workers)  # 0: served by one process
    # Each worker's build key, and what of it differs from this node's (allowed: moeprune.llamacpp.rpc).
    card.facts["rpc_worker_builds"] = sorted({
        "`{}`{}".format(w["build"]["key"], "".join(f" {name.removeprefix('flags.')}={value}"
                                                  for name, value in sorted(w["build"]["unlike_head"].items())
                                                  if name.startswith("flags.")))
        for w in workers if w.get("build")})


def _eval_score_numbers(card: CardNumbers, inputs: CardInputs) -> None:
    """Per evaluated model: the GGUF it served (checked against the file with that sha256), and per
    task its scores, error analysis, response lengths and canary counts."""
    results, source = inputs.results, inputs.source
    for model in _evaluated_models(results):
        entry = results["models"][model]
        gguf = entry["gguf"]
        located = source.gguf_by_sha256(gguf["sha256"])
        if located is not None and located[1]["size_bytes"] != gguf["size_bytes"]:
            raise CardError(f"{RESULTS}: models.{model}.gguf.size_bytes = {gguf['size_bytes']} but the file "
                            f"{located[0]} with that sha256 has {located[1]['size_bytes']} bytes")
        if model == "pruned" and located is not None:
            card.facts["eval_gguf"] = located[0]
        card.add(f"gguf.{model}_bytes", gguf["size_bytes"], fmt_bytes(gguf["size_bytes"]),
                 f"{RESULTS}: models.{model}.gguf" + (f" = {located[0]}" if located else ""))
        for task in results["settings"]["tasks"]:
            task_entry = entry["tasks"].get(task)
            if task_entry is None:
                continue
            _task_score_numbers(card, model, task, task_entry)
            errors = task_entry["error_analysis"]
            _error_numbers(card, f"err.{model}.{task}", errors)
            _length_numbers(card, f"err.{model}.{task}", errors["response_length"])
            _canary_numbers(card, model, task, errors["canary"])


def _task_score_numbers(card: CardNumbers, model: str, task: str, task_entry: dict[str, Any]) -> None:
    card.add(f"eval.{model}.{task}.n", task_entry["n_samples"], fmt_int(task_entry["n_samples"]),
             f"{RESULTS}: models.{model}.tasks.{task}.n_samples")
    for filter_name, metrics in sorted(task_entry["scores"].items()):
        score = metrics.get(PRIMARY_METRIC) or next(iter(metrics.values()))
        stderr = score["stderr"]
        display = fmt_pct(score["value"]) + (f" ± {fmt_pct(stderr)}" if stderr is not None else "")
        card.add(f"eval.{model}.{task}.{filter_name}", score["value"], display,
                 f"{RESULTS}: models.{model}.tasks.{task}.scores.{filter_name}")


def _error_numbers(card: CardNumbers, base_key: str, errors: dict[str, Any]) -> None:
    """Correct, wrong and invalid answers (counts and shares) and the wrong answers' letters."""
    total = errors["total"]
    for kind in ("correct", "wrong", "invalid"):
        card.add(f"{base_key}.{kind}", errors[kind], fmt_int(errors[kind]), f"{RESULTS}: error_analysis.{kind}")
        card.add(f"{base_key}.{kind}_pct", errors[kind] / total, fmt_pct(errors[kind] / total, 1),
                 f"{base_key}.{kind} / {base_key}.total")
    card.add(f"{base_key}.total", total, fmt_int(total), f"{RESULTS}: error_analysis.total")
    for letter, count in sorted(errors["wrong_answer_letters"].items()):
        card.add(f"{base_key}.wrong_letter.{letter}", count, str(count), f"{RESULTS}: error_analysis.wrong_answer_letters")


def _length_numbers(card: CardNumbers, base_key: str, lengths: dict[str, Any]) -> None:
    """Response lengths (median, mean, max; how many answers ran over each mark)."""
    if not lengths["count"]:
        return
    where = f"{RESULTS}: error_analysis.response_length"
    for name, field_name in (("median_chars", "median_chars"), ("median_tokens", "median_tokens_approx"),
                             ("mean_chars", "mean_chars"), ("mean_tokens", "mean_tokens_approx")):
        card.add(f"{base_key}.{name}", lengths[field_name], fmt_int(round(lengths[field_name])), where)
    card.add(f"{base_key}.max_chars", lengths["max_chars"], fmt_int(lengths["max_chars"]), where)
    for mark, count in sorted(lengths["over_chars"].items(), key=lambda kv: int(kv[0])):
        card.add(f"{base_key}.over.{mark}", count, str(count), where)


def _canary_numbers(card: CardNumbers, model: str, task: str, canary: dict[str, Any]) -> None:
    """The canary's counts (truncated, looping, empty answers) and its loop rule, stated once."""
    for kind in ("truncated", "looping", "empty"):
        if canary[kind] is not None:
            card.add(f"err.{model}.{task}.{kind}", canary[kind], fmt_int(canary[kind]),
                     f"{RESULTS}: models.{model}.tasks.{task}.error_analysis.canary.{kind}")
    for name, value in canary["loop_rule"].items():
        if f"canary.{name}" not in card.numbers:  # one rule for every model and task
            card.add(f"canary.{name}", value, fmt_int(value), f"{RESULTS}: error_analysis.canary.loop_rule")


def _gguf_file_numbers(card: CardNumbers, inputs: CardInputs) -> None:
    """The published GGUF files' sizes, and the pruned GGUF's size against the base's."""
    files = []
    for name, entry in sorted(inputs.source.gguf_files.items()):
        if entry["published"]:
            files.append({"name": name, "key": card.add(f"gguf.file.{name}", entry["size_bytes"],
                                                        fmt_bytes(entry["size_bytes"]), f"gguf/{name}")})
    card.tables["gguf_files"] = files
    if all(f"gguf.{m}_bytes" in card.numbers for m in ("base", "pruned")):
        ratio = card.numbers["gguf.pruned_bytes"].value / card.numbers["gguf.base_bytes"].value - 1
        card.add("gguf.delta", ratio, fmt_signed_pct(ratio, 1), "gguf.pruned_bytes / gguf.base_bytes - 1")


def _comparison_numbers(card: CardNumbers, inputs: CardInputs) -> None:
    """Pruned against base: the primary score's difference and, per task, the paired comparison
    (agreement table, McNemar p, bootstrap interval)."""
    results = inputs.results
    primary = results["settings"]["tasks"][0]
    base_primary = _score(results, "base", primary, PRIMARY_FILTER)
    pruned_primary = _score(results, "pruned", primary, PRIMARY_FILTER)
    if base_primary and pruned_primary:
        diff = pruned_primary["value"] - base_primary["value"]
        card.add("eval.delta", diff, fmt_pp(diff), f"pruned - base, {PRIMARY_FILTER}")
    comparisons = []
    for task, comparison in sorted(results.get("comparisons", {}).items()):
        key = f"cmp.{task}"
        where = f"{RESULTS}: comparisons.{task}"
        table = comparison["table"]
        for name in ("both_correct", "base_only_correct", "pruned_only_correct", "both_wrong"):
            card.add(f"{key}.{name}", table[name], fmt_int(table[name]), f"{where}.table")
        card.add(f"{key}.n", comparison["n"], fmt_int(comparison["n"]), f"{where}.n")
        card.add(f"{key}.difference", comparison["difference"], fmt_pp(comparison["difference"]), f"{where}.difference")
        card.add(f"{key}.p", comparison["mcnemar"]["p_value"], fmt_p(comparison["mcnemar"]["p_value"]),
                 f"{where}.mcnemar.p_value")
        boot = comparison["bootstrap"]
        card.add(f"{key}.ci_low", boot["low"], fmt_pp(boot["low"]), f"{where}.bootstrap")
        card.add(f"{key}.ci_high", boot["high"], fmt_pp(boot["high"]), f"{where}.bootstrap")
        card.add(f"{key}.confidence", boot["confidence"], fmt_pct(boot["confidence"], 0), f"{where}.bootstrap")
        comparisons.append({"task": task, "key": key, "filter": comparison["filter"]})
        card.series.setdefault("agreement", {})[task] = table
    card.tables["comparisons"] = comparisons


def fmt_mse(value: float) -> str:
    return f"{value:.3e}"


def _recalibration_numbers(card: CardNumbers, inputs: CardInputs) -> None:
    """The router recalibration, from the published checkpoint's ``recalibrate.json`` (nothing when
    the checkpoint was not recalibrated): its settings and, per MoE layer, the held-out loss before
    and after the fit."""
    from moeprune.recalibrate import FIT_SETTINGS, RECORD_NAME

    path = inputs.source.model_dir / RECORD_NAME
    if not path.is_file():
        return
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        if "model_fit" in record:
            _model_kl_numbers(card, record, path)
            return
        settings, layers, held = record["settings"], record["layers"], record["holdout_sequences"]
        rows = [(int(layer["layer"]), float(layer["holdout_mse_before"]), float(layer["holdout_mse_after"]),
                 int(layer["steps"]), bool(layer["changed"]), int(layer["holdout_tokens"])) for layer in layers]
        values = {name: settings[name] for name in FIT_SETTINGS}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CardError(f"{path}: not a recalibration record ({exc!r} is missing or malformed); rerun the "
                        "recalibrate stage") from None
    if not rows:
        raise CardError(f"{path}: records no layer; rerun the recalibrate stage")
    src = RECORD_NAME
    _recalibration_settings(card, values)
    card.add("recal.holdout_sequences", len(held), fmt_int(len(held)), f"{src}: holdout_sequences")
    card.add("recal.holdout_tokens", rows[0][5], fmt_int(rows[0][5]), f"{src}: layers[].holdout_tokens")
    card.add("recal.layers", len(rows), fmt_int(len(rows)), f"{src}: layers")
    changed = sum(row[4] for row in rows)
    card.add("recal.layers_changed", changed, fmt_int(changed), f"{src}: layers[].changed")
    table = []
    for layer, before, after, steps, _, _ in rows:
        key = f"recal.layer.{layer}"
        where = f"{src}: layers[{layer}]"
        card.add(f"{key}.before", before, fmt_mse(before), f"{where}.holdout_mse_before")
        card.add(f"{key}.after", after, fmt_mse(after), f"{where}.holdout_mse_after")
        change = after / before - 1 if before > 0 else 0.0
        card.add(f"{key}.change", change, fmt_signed_pct(change, 1), f"{key}.after / {key}.before - 1")
        card.add(f"{key}.steps", steps, fmt_int(steps), f"{where}.steps")
        table.append({"layer": layer, "key": key})
    before_total, after_total = sum(row[1] for row in rows), sum(row[2] for row in rows)
    total_change = after_total / before_total - 1 if before_total > 0 else 0.0
    card.add("recal.total_change", total_change, fmt_signed_pct(total_change, 1),
             "sum of recal.layer.*.after / sum of recal.layer.*.before - 1")
    card.tables["recalibration"] = table


def _recalibration_settings(card: CardNumbers, values: dict[str, Any]) -> None:
    """``recal.<setting>`` for each recorded fit setting (the held-out fraction as a percentage)."""
    from moeprune.recalibrate import RECORD_NAME

    for name, value in values.items():
        shown = fmt_pct(value, 0) if name == "holdout_fraction" else f"{value:g}"
        card.add(f"recal.{name}", value, shown, f"{RECORD_NAME}: settings.{name}")


def _model_kl_numbers(card: CardNumbers, record: dict[str, Any], path: Path) -> None:
    """The ``model-kl`` recalibration (one fit of every router tensor against the base's logits):
    its settings, the held-out KL before and after, and which layers changed."""
    from moeprune.recalibrate import MODEL_KL_SETTINGS, RECORD_NAME

    try:
        settings, fitted, layers = record["settings"], record["model_fit"], record["layers"]
        values = {name: settings[name] for name in ("learning_rate", "holdout_fraction", "seed",
                                                    *MODEL_KL_SETTINGS) if name != "objective"}
        before, after = float(fitted["holdout_kl_before"]), float(fitted["holdout_kl_after"])
        counts = {name: int(fitted[name]) for name in ("train_tokens", "holdout_tokens", "steps", "best_step")}
        rows = [(int(layer["layer"]), bool(layer["changed"])) for layer in layers]
        text_sha256 = str(settings["text_sha256"])
    except (ValueError, KeyError, TypeError) as exc:
        raise CardError(f"{path}: not a model-kl recalibration record ({exc!r} is missing or malformed); rerun the "
                        "recalibrate stage") from None
    if not rows:
        raise CardError(f"{path}: records no layer; rerun the recalibrate stage")
    src = RECORD_NAME
    _recalibration_settings(card, values)
    card.facts["recal_text_sha256"] = text_sha256
    card.add("recal.kl_before", before, f"{before:.4f}", f"{src}: model_fit.holdout_kl_before")
    card.add("recal.kl_after", after, f"{after:.4f}", f"{src}: model_fit.holdout_kl_after")
    change = after / before - 1 if before > 0 else 0.0
    card.add("recal.kl_change", change, fmt_signed_pct(change, 1), "recal.kl_after / recal.kl_before - 1")
    for name, value in counts.items():
        card.add(f"recal.{name}", value, fmt_int(value), f"{src}: model_fit.{name}")
    card.add("recal.layers", len(rows), fmt_int(len(rows)), f"{src}: layers")
    changed = sum(row[1] for row in rows)
    card.add("recal.layers_changed", changed, fmt_int(changed), f"{src}: layers[].changed")
    card.tables["recalibration"] = [{"layer": layer, "changed": was} for layer, was in rows]


_SIDE_BY_SIDE = (("base", "base-eval"), ("plain", "plain-eval"), ("pruned", "pruned-eval"))
"""The side-by-side table's columns: (evaluated model, KLD row role) of base, plain pruned and
pruned + recalibrated, all at the eval type."""


def _side_by_side_numbers(card: CardNumbers, inputs: CardInputs) -> None:
    """What the recalibration buys at the same size: base, plain pruned and pruned + recalibrated
    side by side (a table of keys the other sections added), and the recalibrated model's mean KLD
    as a fraction of the plain pruned one's. Nothing unless the plain pruned model was evaluated."""
    models = [model for model, _ in _SIDE_BY_SIDE]
    if not all(model in inputs.results["models"] for model in models):
        return
    rows = [{"name": "GGUF size", "cells": [f"gguf.{m}_bytes" for m in models]}]
    for task in inputs.results["settings"]["tasks"]:
        keys = [f"eval.{m}.{task}.{PRIMARY_FILTER}" for m in models]
        if all(key in card.numbers for key in keys):
            rows.append({"name": f"{task} ({PRIMARY_FILTER})", "cells": keys})
    points = {point["role"]: point for point in card.series.get("kld", {}).get("points", [])}
    if all(role in points for _, role in _SIDE_BY_SIDE):
        for name, suffix in (("Mean KLD (nats/token)", "kld"), ("Top-1 agreement", "top1")):
            rows.append({"name": name, "cells": [f"kld.{points[role]['label']}.{suffix}" for _, role in _SIDE_BY_SIDE]})
        plain, recalibrated = points["plain-eval"], points["pruned-eval"]
        keys = f"kld.{recalibrated['label']}.kld and kld.{plain['label']}.kld"
        if plain["kld"] > 0:
            ratio = recalibrated["kld"] / plain["kld"]
            card.add("recal.kld_ratio", ratio, f"{ratio:.2f}×", f"ratio of {keys}")
        gap = plain["kld"] - recalibrated["kld"]
        spread = math.hypot(plain["stderr"], recalibrated["stderr"])
        sigmas = abs(gap) / spread if spread > 0 else math.inf
        card.add("recal.kld_gain", gap, f"{gap:+.4f}".replace("-", "−"), f"difference of {keys}")
        card.add("recal.kld_sigmas", sigmas, f"{sigmas:.1f}", "|recal.kld_gain| / combined uncertainty (eval/kld.json)")
    card.tables["side_by_side"] = rows


SECTIONS = (_size_numbers, _expert_numbers, _arch_numbers, _retention_numbers, _calibration_numbers,
            _recalibration_numbers, _findings_numbers, _eval_setting_numbers, _eval_score_numbers, _gguf_file_numbers,
            _comparison_numbers, _gguf_bits_numbers, _kld_numbers, _side_by_side_numbers)
"""The card's sections in order, each ``(card, inputs) -> None``."""
