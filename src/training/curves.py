"""Training curves from train.py's log: loss, accuracy and learning rate against steps.

A loss line starts as the reference's, `epoch: 1 step: 39000, loss is 1.5936852`, and goes on with
`, name: value[ unit]` pairs (`step time: 12.3 ms, lr: 0.0099, accuracy: 0.25`). Every named value
is read, whatever its name, so a training that logs more terms (DELG's losses) plots without a
change here. Panels group the names: losses (`loss`, `*loss`), accuracies (`*acc*`), the learning
rate (`lr`), then one panel per other name; the step time is not plotted.

A log holds one curve per training stage (the `<stage> stage, rank r of n:` line that starts every
run names it). A resumed run appends to its log and continues the stage's curve; a step logged
twice (a resume from an earlier checkpoint) keeps its latest value.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from model_utils.cli import InputError
from model_utils.files import atomic_output

LOSS_LINE = re.compile(r"epoch: (?P<epoch>\d+) step: (?P<step>\d+), loss is (?P<loss>[^,\s]+)(?P<rest>.*)$")
NAMED_VALUE = re.compile(r"(?P<name>[A-Za-z_][\w ]*?): (?P<value>[^\s,]+)(?: [A-Za-z]+)?$")
STAGE_LINE = re.compile(r"(?:^|: )(?P<stage>\w+) stage, rank \d+ of \d+:")
NOT_PLOTTED = frozenset({"step time"})


@dataclass
class TrainingCurve:
    """The logged values of one stage of one log, by step."""

    label: str
    values: dict[str, dict[int, float]] = field(default_factory=dict)  # name -> step -> value

    def series(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(steps, values) of one name, in step order."""
        by_step = self.values.get(name, {})
        steps = np.array(sorted(by_step), dtype=np.int64)
        return steps, np.array([by_step[step] for step in steps], dtype=np.float64)


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def parse_loss_line(line: str) -> tuple[int, dict[str, float]] | None:
    """(step, {name: value}) of a loss line (the loss under the name `loss`); None for other lines."""
    match = LOSS_LINE.search(line)
    if match is None or _number(match["loss"]) is None:
        return None
    values = {"loss": _number(match["loss"])}
    for part in match["rest"].split(", ")[1:]:
        named = NAMED_VALUE.fullmatch(part.strip())
        if named and _number(named["value"]) is not None:
            values[named["name"]] = _number(named["value"])
    return int(match["step"]), values


def read_training_log(path: str | os.PathLike) -> list[TrainingCurve]:
    """The curves of a train.py log, one per stage in the order they first appear."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        raise InputError(f"training log {path} does not exist") from None
    except IsADirectoryError:
        raise InputError(f"training log {path} is a folder, not a log file") from None
    curves: dict[str, TrainingCurve] = {}
    stage = ""
    for line in text.splitlines():
        started = STAGE_LINE.search(line)
        if started:
            stage = started["stage"]
            continue
        parsed = parse_loss_line(line)
        if parsed is None:
            continue
        step, values = parsed
        curve = curves.setdefault(stage, TrainingCurve(f"{path.name} ({stage})" if stage else path.name))
        for name, value in values.items():
            curve.values.setdefault(name, {})[step] = value
    if not curves:
        raise InputError(f"training log {path} holds no loss lines ('epoch: E step: S, loss is L')")
    if len(curves) == 1:  # one stage: the file name says enough
        next(iter(curves.values())).label = path.name
    return list(curves.values())


def _panel_of(name: str) -> str:
    lowered = name.lower()
    if lowered == "loss" or lowered.endswith("loss"):
        return "loss"
    if "acc" in lowered:
        return "accuracy"
    if lowered in ("lr", "learning rate", "learning_rate"):
        return "learning rate"
    return name


def plot_training_curves(curves: Sequence[TrainingCurve], output_path: str | os.PathLike,
                         title: str | None = None) -> Path:
    """One PNG: a panel per quantity (loss, accuracy, learning rate, other named values), a line per
    curve (and per name where a panel holds several), against the step. Written atomically."""
    panels: dict[str, list[str]] = {}
    for curve in curves:
        for name in curve.values:
            if name not in NOT_PLOTTED:
                names = panels.setdefault(_panel_of(name), [])
                if name not in names:
                    names.append(name)
    fixed = [panel for panel in ("loss", "accuracy", "learning rate") if panel in panels]
    order = fixed + sorted(set(panels) - set(fixed))
    figure = Figure(figsize=(5.0 * len(order), 3.8), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    colours = [f"C{index % 10}" for index in range(len(curves))]
    for index, panel in enumerate(order):
        axes = figure.add_subplot(1, len(order), index + 1)
        for curve, colour in zip(curves, colours, strict=True):
            for style, name in zip(("-", "--", ":", "-."), panels[panel], strict=False):
                steps, values = curve.series(name)
                if steps.size:
                    label = curve.label if len(panels[panel]) == 1 else f"{curve.label}: {name}"
                    axes.plot(steps, values, style, color=colour, linewidth=1.2, label=label,
                              marker="." if steps.size < 30 else None)
        axes.set_title(panel)
        axes.set_xlabel("step")
        axes.grid(alpha=0.3)
        if panel == "accuracy":
            axes.set_ylim(-0.02, 1.02)
        if len(curves) > 1 or len(panels[panel]) > 1:
            axes.legend(fontsize=8)
    if title:
        figure.suptitle(title)
    output_path = Path(output_path)
    with atomic_output(output_path) as temporary, open(temporary, "wb") as stream:
        figure.savefig(stream, format="png")
    return output_path


def write_training_curves(log_paths: Sequence[str | os.PathLike], output_path: str | os.PathLike) -> Path:
    """Read the logs and plot every curve in them into one PNG."""
    curves = [curve for path in log_paths for curve in read_training_log(path)]
    return plot_training_curves(curves, output_path)
