"""The card's figures (matplotlib, Agg backend, no network): PNG files in ``card/plots/``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

MAX_LABELLED_CURVES = 8  # more layers than this: the concentration curves get no legend


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    # No creation date or software version in the file: the same data gives the same bytes.
    fig.savefig(path, dpi=110, bbox_inches="tight", metadata={"Software": None})
    fig.clf()


def render_plots(series: dict[str, Any], out_dir: Path) -> list[Path]:
    """Write the plots for which ``series`` has data; return their paths."""
    plt = _pyplot()
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for name, (key, draw) in PLOTS.items():
        data = series.get(key)
        if not data:
            continue
        fig = draw(plt, data)
        written.append(out_dir / name)
        _save(fig, written[-1])
        plt.close(fig)
    return written


def _retention(plt: Any, retention: dict[str, Any]) -> Any:
    fig, ax = plt.subplots(figsize=(8, 3.2))
    layers = retention["layers"]
    ax.bar([str(layer) for layer in layers], [100 * f for f in retention["fractions"]], color="#4c72b0")
    if retention.get("threshold") is not None:
        ax.axhline(100 * retention["threshold"], color="#c44e52", linestyle="--", label="threshold")
        ax.legend(loc="lower right")
    low = min(retention["fractions"] + [retention.get("threshold") or 1.0])
    ax.set_ylim(max(0.0, 100 * low - (100 - 100 * low) * 0.5 - 0.5), 100.05)
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("retained contribution (%)")
    ax.set_title("Contribution retained per layer after pruning")
    return fig


def _concentration(plt: Any, concentration: dict[str, Any]) -> Any:
    fig, ax = plt.subplots(figsize=(6, 4))
    cmap = plt.get_cmap("viridis")
    count = len(concentration["layers"])
    labelled = count <= MAX_LABELLED_CURVES
    for i, (layer, curve) in enumerate(zip(concentration["layers"], concentration["cumulative"])):
        ax.plot(range(1, len(curve) + 1), curve, color=cmap(i / max(1, count - 1)), linewidth=1,
                label=f"L{layer}" if labelled else None)
    ax.set_xlabel("experts (largest contribution first)")
    ax.set_ylabel("cumulative share of contribution")
    ax.set_title("Contribution concentration per layer")
    ax.set_ylim(0, 1.01)
    if labelled:
        ax.legend(fontsize="small")
    return fig


def _gini(plt: Any, gini: dict[str, Any]) -> Any:
    fig, ax = plt.subplots(figsize=(8, 3))
    ax.bar([str(layer) for layer in gini["layers"]], gini["gini"], color="#55a868")
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("Gini coefficient")
    ax.set_title("Concentration of expert contribution (Gini) per layer")
    return fig


def _agreement(plt: Any, agreement: dict[str, Any]) -> Any:
    tasks = sorted(agreement)
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.6 * len(tasks), 3.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        table = agreement[task]
        grid = [[table["both_correct"], table["base_only_correct"]],
                [table["pruned_only_correct"], table["both_wrong"]]]
        ax.imshow(grid, cmap="Blues")
        for r in range(2):
            for c in range(2):
                ax.text(c, r, str(grid[r][c]), ha="center", va="center", fontsize=12)
        ax.set_xticks([0, 1], ["pruned correct", "pruned wrong"])
        ax.set_yticks([0, 1], ["base correct", "base wrong"])
        ax.set_title(task)
    fig.suptitle("Base vs pruned, same questions")
    return fig


def _kld(plt: Any, kld: dict[str, Any]) -> Any:
    from matplotlib.ticker import FuncFormatter

    fig, ax = plt.subplots(figsize=(7, 4.2))
    recalibrated = any(p["model"] == "plain" for p in kld["points"])
    series = (("base", "#4c72b0", "base quants"),
              ("pruned", "#dd8452", "pruned + recalibrated quants" if recalibrated else "pruned quants"),
              ("plain", "#55a868", "plain pruned (before recalibration)"))
    for model, color, legend in series:
        points = sorted((p for p in kld["points"] if p["model"] == model), key=lambda p: p["size_bytes"])
        if not points:
            continue
        sizes = [p["size_bytes"] / 1e6 for p in points]
        ax.errorbar(sizes, [p["kld"] for p in points], yerr=[p["stderr"] for p in points], color=color,
                    marker="o", linestyle="-" if model == "base" else ":", capsize=3, label=legend)
        for p, size in zip(points, sizes):
            ax.annotate(p["quant_type"], (size, p["kld"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    for label, marker, name in ((kld["rival"], "s", "equal-size rival"), (kld["pruned"], "D", "this model")):
        point = next((p for p in kld["points"] if p["label"] == label), None)
        if point is not None:
            ax.scatter([point["size_bytes"] / 1e6], [point["kld"]], s=140, facecolors="none",
                       edgecolors="black", marker=marker, label=name, zorder=5)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel("GGUF file size (MB)")
    ax.set_ylabel("mean KL divergence to the base (nats/token)")
    ax.set_title("What pruning costs, and what quantization costs")
    ax.legend(fontsize="small")
    return fig


PLOTS = {
    "retention.png": ("retention", _retention),
    "concentration.png": ("concentration", _concentration),
    "gini.png": ("gini", _gini),
    "agreement.png": ("agreement", _agreement),
    "kld.png": ("kld", _kld),
}
"""{file name: (card series key, draw(pyplot, series) -> figure)}, in the order they are written."""
PLOT_NAMES = tuple(PLOTS)
