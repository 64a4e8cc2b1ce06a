"""The report's charts (matplotlib, PNG bytes to embed in the page): AP per query, precision-recall per protocol."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

PROTOCOL_COLOURS = {"easy": "#4caf50", "medium": "#1e88e5", "hard": "#e53935"}
RECALL_GRID = np.linspace(0.0, 1.0, 101)


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80)
    return buffer.getvalue()


def ap_bar_chart(query_names: Sequence[str], aps: Mapping[str, np.ndarray]) -> bytes:
    """Grouped bars: one group per query (in the given order), one bar per protocol; AP in percent."""
    count = len(query_names)
    rotated = count > 8
    below = 1.5 if rotated else 0.4  # inches for the query names
    width, height = min(max(6.0, 0.3 * count + 1.5), 60.0), 3.2 + below
    figure = Figure(figsize=(width, height))
    # Fixed margins in inches: a layout engine would double the drawing time.
    figure.subplots_adjust(left=0.7 / width, right=1 - 0.2 / width, top=1 - 0.4 / height, bottom=below / height)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    width = 0.8 / max(len(aps), 1)
    positions = np.arange(count)
    for index, (protocol, values) in enumerate(aps.items()):
        axes.bar(positions + (index - (len(aps) - 1) / 2) * width, 100 * np.nan_to_num(np.asarray(values)), width,
                 label=protocol, color=PROTOCOL_COLOURS.get(protocol))
    axes.set_xticks(positions, [name if len(name) <= 24 else name[:23] + "…" for name in query_names],
                    rotation=90 if rotated else 0, fontsize=7 if count > 30 else 8)
    axes.set_xlim(-0.6, count - 0.4)
    axes.set_ylim(0, 100)
    axes.set_ylabel("AP (%)")
    axes.set_title("Average precision per query (worst medium AP first)")
    axes.grid(axis="y", alpha=0.3)
    axes.legend(fontsize=8, ncols=len(aps))
    return _png(figure)


def interpolated_precision(recall: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """Precision at RECALL_GRID: the best precision at that recall or above (0 beyond the last positive)."""
    recall, precision = np.asarray(recall, dtype=np.float64), np.asarray(precision, dtype=np.float64)
    result = np.zeros_like(RECALL_GRID)
    if recall.size:
        best_from = np.maximum.accumulate(precision[::-1])[::-1]
        first = np.searchsorted(recall, RECALL_GRID - 1e-9)  # the first point at that recall or above
        inside = first < recall.size
        result[inside] = best_from[first[inside]]
    return result


def precision_recall_chart(curves: Mapping[str, Sequence[tuple[np.ndarray, np.ndarray]]]) -> bytes:
    """One panel per protocol: every query's precision-recall curve (thin) and their mean interpolated one."""
    width, height = 4.2 * max(len(curves), 1), 3.6
    figure = Figure(figsize=(width, height))
    figure.subplots_adjust(left=0.6 / width, right=1 - 0.2 / width, top=1 - 0.35 / height, bottom=0.55 / height,
                           wspace=0.3)
    FigureCanvasAgg(figure)
    for index, (protocol, query_curves) in enumerate(curves.items()):
        axes = figure.add_subplot(1, len(curves), index + 1)
        colour = PROTOCOL_COLOURS.get(protocol, "C0")
        for recall, precision in query_curves:
            if len(recall):
                axes.plot(recall, precision, color=colour, alpha=0.4, linewidth=0.8)
        if query_curves:
            mean = np.mean([interpolated_precision(recall, precision) for recall, precision in query_curves], axis=0)
            axes.plot(RECALL_GRID, mean, color="black", linewidth=2, label="mean (interpolated)")
            axes.legend(fontsize=8, loc="lower left")
        axes.set_title(f"{protocol}: {len(query_curves)} queries")
        axes.set_xlabel("recall")
        axes.set_ylabel("precision")
        axes.set_xlim(0, 1.01)
        axes.set_ylim(0, 1.02)
        axes.grid(alpha=0.3)
    return _png(figure)
