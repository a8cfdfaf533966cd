"""The run's training curves from its ``metrics.jsonl``: loss, learning rate, balance, expert load.

The trainer writes one JSON object per logged step (``loss``, ``nll``, ``aux_loss`` = the
weighted MoE balance terms, ``lr``, ``tokens_per_s``, ``max_over_mean_load`` = the busiest
expert's load over the mean, worst layer; ``expert_load`` = each MoE layer's share of the
assignments per expert) and one per evaluation (``valid_loss``, ``bleu``, ...). Logs of older
runs lack ``expert_load``; their expert load over training is the max/mean ratio alone.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from moeformer.inspect.files import figure_png
from moeformer.inspect.fonts import plot_style
from moeformer.inspect.plots import bounded

LOG_NAME = "metrics.jsonl"
# panel title -> which numeric keys it draws
PANELS: dict[str, Callable[[str], bool]] = {
    "loss": lambda k: k in ("loss", "nll", "valid_loss"),
    "learning rate": lambda k: k == "lr",
    "MoE balance terms (weighted sum and unweighted terms)": lambda k: k == "aux_loss" or k.startswith("loss_"),
    "expert load: busiest expert / mean (1 = balanced)": lambda k: "load" in k,
    "translation quality (validation sample)": lambda k: k in ("bleu", "chrf"),
}


@dataclass
class TrainingLog:
    path: Path
    train: list[dict[str, float]] = field(default_factory=list)  # rows with "loss"
    evals: list[dict[str, float]] = field(default_factory=list)  # rows with "valid_loss"
    skipped: int = 0  # lines that were not JSON objects with a step
    expert_load: dict[str, tuple[list[float], list[list[float]]]] = field(default_factory=dict)  # layer -> rows


def _add_expert_load(log: TrainingLog, step: float, loads: object) -> None:
    if not isinstance(loads, dict):
        return
    for layer, shares in loads.items():
        if isinstance(shares, list) and shares and all(isinstance(x, (int, float)) for x in shares):
            steps, rows = log.expert_load.setdefault(str(layer), ([], []))
            steps.append(step)
            rows.append([float(x) for x in shares])


def find_log(checkpoint_dir: Path) -> Path | None:
    """``metrics.jsonl`` of the run a checkpoint belongs to (run/checkpoints/step-N -> run/)."""
    for folder in (checkpoint_dir, checkpoint_dir.parent, checkpoint_dir.parent.parent):
        if (folder / LOG_NAME).is_file():
            return folder / LOG_NAME
    return None


def read_log(path: Path) -> TrainingLog:
    """Rows of a metrics log; lines that are not JSON objects with a ``step`` are skipped and counted."""
    log = TrainingLog(Path(path))
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict) or not isinstance(row.get("step"), (int, float)):
            log.skipped += bool(line.strip())
            continue
        numeric = {k: float(v) for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        _add_expert_load(log, numeric["step"], row.get("expert_load"))
        (log.train if "loss" in row else log.evals).append(numeric)
    return log


def plot_curves(log: TrainingLog) -> bytes | None:
    """One panel per group of logged values that is present; None when the log has no rows."""
    import matplotlib.pyplot as plt

    panels = {title: _series(log, wanted) for title, wanted in PANELS.items()}
    panels = {title: series for title, series in panels.items() if series}
    if not panels:
        return None
    with plot_style():
        fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False, layout="constrained")
        for ax, (title, series) in zip(axes[0], panels.items()):
            for label, (steps, values) in series.items():
                ax.plot(steps, values, marker="." if len(steps) < 30 else None, label=label)
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
            if title == "loss":
                ax.set_yscale("log")
        return figure_png(fig)


def _series(log: TrainingLog, wanted: Callable[[str], bool]) -> dict[str, tuple[list[float], list[float]]]:
    """key -> (steps, values) of every logged key ``wanted`` accepts."""
    out: dict[str, tuple[list[float], list[float]]] = {}
    for row in (*log.train, *log.evals):
        for key, value in row.items():
            if key != "step" and wanted(key):
                steps, values = out.setdefault(key, ([], []))
                steps.append(row["step"])
                values.append(value)
    return out


def plot_expert_load(log: TrainingLog) -> bytes | None:
    """Per MoE layer, load x E of every expert (rows) at every logged step (columns); 1 = uniform."""
    import matplotlib.pyplot as plt
    import numpy as np

    layers = {k: v for k, v in log.expert_load.items() if len({len(r) for r in v[1]}) == 1}
    if not layers:
        return None
    cols = 2 if len(layers) == 4 else min(3, len(layers))
    rows = -(-len(layers) // cols)
    with plot_style():
        size, _ = bounded(4.6 * cols, 2.6 * rows)
        fig, axes = plt.subplots(rows, cols, figsize=size, squeeze=False, layout="constrained")
        image = None
        for ax, (layer, (steps, shares)) in zip(axes.flat, layers.items()):
            grid = np.array(shares).T * len(shares[0])  # (experts, steps), 1 = a uniform share
            image = ax.imshow(grid, aspect="auto", cmap="RdBu_r", vmin=0, vmax=2, interpolation="nearest",
                              extent=(*_step_span(steps), grid.shape[0] - 0.5, -0.5))  # fmt: skip
            ax.set_title(layer, fontsize=9)
            ax.set_xlabel("step")
            ax.set_ylabel("expert")
        for ax in list(axes.flat)[len(layers) :]:
            ax.axis("off")
        fig.colorbar(image, ax=axes, shrink=0.8, label="load x E (1 = uniform)")
        return figure_png(fig)


def _step_span(steps: list[float]) -> tuple[float, float]:
    """The x extent of the columns; one logged step gets a column of width 1, not an empty axis."""
    return (steps[0], steps[-1]) if steps[-1] > steps[0] else (steps[0] - 0.5, steps[0] + 0.5)
