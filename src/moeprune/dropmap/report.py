"""The per-layer retention report of a drop map, laid out like the card's table.

Every number comes from the drop map dict (which came from the profile): layer, experts kept,
retained % of the contribution sum. Many layers are shown as three column pairs side by side, and
the worst layer is highlighted.
"""

from __future__ import annotations

import io
from typing import Any

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

GROUPS_WHEN_MANY = 3
MANY_LAYERS = 10  # more layers than this are split into column groups, as on the card


def format_percent(fraction: float, threshold: float | None = None) -> str:
    """``0.99012 -> '99.01%'``; more digits when two would print a passing value as the threshold."""
    for digits in (2, 3, 4):
        shown = f"{100 * fraction:.{digits}f}%"
        if threshold is None or threshold >= 1.0 or f"{100 * threshold:.{digits}f}%" != shown:
            return shown
    return shown


def retention_table(drop_map: dict[str, Any]) -> Table:
    """A rich table: (Layer, Kept, Retained %) per layer, worst layer in bold red."""
    layers = drop_map["layers"]
    threshold = drop_map["strategy"]["retention_threshold"]
    worst = min(range(len(layers)), key=lambda i: (layers[i]["retained_fraction"], i))
    groups = GROUPS_WHEN_MANY if len(layers) > MANY_LAYERS else 1
    rows = -(-len(layers) // groups)
    table = Table(title="Retained per layer", title_justify="left")
    for _ in range(groups):
        table.add_column("Layer", justify="left")
        table.add_column("Kept", justify="right")
        table.add_column("Retained %", justify="right")
    for row in range(rows):
        cells: list[Text | str] = []
        for group in range(groups):
            index = group * rows + row
            if index >= len(layers):
                cells += ["", "", ""]
                continue
            entry = layers[index]
            style = "bold red" if index == worst else ""
            cells += [
                Text(f"L{entry['layer']}", style=style),
                Text(str(len(entry["keep"])), style=style),
                Text(format_percent(entry["retained_fraction"], threshold), style=style),
            ]
        table.add_row(*cells)
    return table


def summary_lines(drop_map: dict[str, Any]) -> list[str]:
    """What was chosen and why, in a few sentences."""
    strategy = drop_map["strategy"]
    layers = drop_map["layers"]
    num_experts = drop_map["num_experts"]
    threshold = strategy["retention_threshold"]
    worst = min(layers, key=lambda e: (e["retained_fraction"], e["layer"]))
    lines = [f"strategy {strategy['name']}, ranked by {strategy['criterion']}"
             + (f", protecting each layer's top {strategy['protect_top_k']}" if strategy["protect_top_k"] else "")
             + (f", threshold > {format_percent(threshold)}" if threshold is not None else "")]
    protect = strategy.get("protect")
    if protect is not None:
        kept = [f"L{e['layer']}:{p['expert']}" for e in layers for p in e.get("protected") or []]
        why = (f"super experts (max activation norm > {protect['threshold']:.6g})" if protect["rule"] == "super-experts"
               else "listed experts")
        lines.append(f"protected {why}: {', '.join(kept) if kept else 'none found'}; always kept")
    groups = drop_map.get("routing_groups")
    if groups is not None:
        lines.append(f"grouped router: every one of the {groups['n_group']} routing groups keeps the same number, "
                     "the best of each group by the criterion")
    counts = [len(e["keep"]) for e in layers]
    if drop_map["uniform"]:
        kept = drop_map["num_experts_kept"]
        lines.append(f"chosen N = {kept}: every layer keeps {kept} of {num_experts} experts "
                     f"({num_experts - kept} dropped per layer)")
    else:
        spread = (f"layers keep {min(counts)} to {max(counts)} of {num_experts} experts "
                  f"(mean {sum(counts) / len(counts):.1f})") if min(counts) != max(counts) else (
                  f"every layer happens to need {counts[0]} of {num_experts} experts")
        lines.append(
            f"NOT uniform (per-layer report): {spread}; transformers and llama.cpp need one count for all "
            f"layers, so the prune stage refuses this map: the uniform count meeting the same threshold is "
            f"{max(counts)} (strategy uniform-min-retention)"
        )
    lines.append(f"worst layer: L{worst['layer']} retains {format_percent(worst['retained_fraction'], threshold)} "
                 "of its contribution")
    summary = drop_map.get("summary") or {}
    if summary.get("limited_by_min_keep"):
        lines.append(f"counts held at the floor of {summary['min_keep']} experts (top-k routing / protected "
                     "experts): the threshold alone would allow fewer")
    return lines


def print_report(drop_map: dict[str, Any], console: Console | None = None) -> None:
    """Print the retention table and the summary lines."""
    console = console or Console()
    console.print(Group(retention_table(drop_map), *(Text(line) for line in summary_lines(drop_map))))


def report_text(drop_map: dict[str, Any], width: int = 120) -> str:
    """The report as plain text (for logs and tests)."""
    buffer = io.StringIO()
    print_report(drop_map, Console(file=buffer, width=width, color_system=None, force_terminal=False))
    return buffer.getvalue()
