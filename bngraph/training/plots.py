"""The figures of `train --track-inputs` and `reproduce`: matplotlib, written atomically.

Renderers only draw what they are given (curves computed elsewhere), like the report's.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from bngraph.atomic import write_atomically

COLORS = {"without BN": "#555555", "with BN": "#1f77b4"}
PERCENTILE_STYLES = (("15th", ":"), ("50th", "-"), ("85th", "--"))


def _pyplot():
    """matplotlib's pyplot, imported when a figure is drawn: ~0.35 s that a `train` run without
    --track-inputs and `reproduce mnist`'s worker process never pay."""
    import matplotlib

    matplotlib.use("Agg")  # no display: figures go to files only; before pyplot is imported
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    plt = _pyplot()
    try:
        # Only into folders bngraph owns (a run, a reproduce folder); --resume redraws inputs.png.
        return write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=130, bbox_inches="tight"), replace_own=True)
    finally:
        plt.close(fig)


def draw_curves(ax, steps: Sequence[int], runs: np.ndarray, label: str, color: str | None = None) -> None:
    """One line per net: the mean over seeds (rows of `runs`), the min-max band around it."""
    runs = np.atleast_2d(np.asarray(runs, dtype=float))
    line = ax.plot(steps, runs.mean(0), label=label, color=color, lw=1.6)[0]
    if len(runs) > 1:
        ax.fill_between(steps, runs.min(0), runs.max(0), color=line.get_color(), alpha=0.2, lw=0)


def draw_percentiles(ax, steps: Sequence[int], quantiles: np.ndarray, color: str = "k") -> None:
    """quantiles: [evaluations, 3] = the 15th, 50th and 85th percentiles (Figure 1(b, c))."""
    quantiles = np.asarray(quantiles, dtype=float)
    for i, (name, style) in enumerate(PERCENTILE_STYLES):
        ax.plot(steps, quantiles[:, i], style, color=color, lw=1.4, label=name)


def plot_fig1(
    steps: Sequence[int], accuracy: dict[str, np.ndarray], quantiles: dict[str, np.ndarray], path: Path, *,
    unit: int, seeds: int = 1,
) -> Path:
    """The paper's Figure 1: (a) test accuracy of both nets (seed mean, min-max band); (b, c) one
    sigmoid input's percentiles in the last hidden layer of the first seed's nets, without and
    with BN, on a shared y-axis."""
    fig, axes = _pyplot().subplots(1, 3, figsize=(13, 3.6))
    ax = axes[0]
    for label, runs in accuracy.items():
        draw_curves(ax, steps, runs, label, COLORS.get(label))
    lowest = min(float(np.asarray(r).mean(0)[len(steps) // 10 :].min()) for r in accuracy.values())
    ax.set_ylim(max(0.0, min(lowest, 0.9) - 0.02), 1.0)
    ax.set_xlabel("training steps")
    ax.set_ylabel("test accuracy")
    ax.set_title("(a) test accuracy" + (f", {seeds} seeds" if seeds > 1 else ""))
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    limits = [np.min([q.min() for q in quantiles.values()]), np.max([q.max() for q in quantiles.values()])]
    pad = 0.05 * (limits[1] - limits[0] or 1.0)
    for ax, (letter, label) in zip(axes[1:], (("b", "without BN"), ("c", "with BN"))):
        draw_percentiles(ax, steps, quantiles[label], COLORS[label])
        ax.set_ylim(limits[0] - pad, limits[1] + pad)
        ax.set_xlabel("training steps")
        which = f"unit {unit}, last hidden layer" + (", first seed" if seeds > 1 else "")
        ax.set_title(f"({letter}) {label}: sigmoid input of {which}", fontsize=9)
        ax.legend(loc="best", fontsize=8)
        ax.grid(alpha=0.3)
    axes[1].set_ylabel("15th / 50th / 85th percentile")
    fig.tight_layout()
    return _save(fig, path)


def plot_accuracy(steps_by_run: dict[str, Sequence[int]], accuracy: dict[str, Sequence[float]], path: Path, *,
                  title: str, reference: float | None = None) -> Path:
    """Test accuracy against steps, one line per run (the Inception variants)."""
    fig, ax = _pyplot().subplots(figsize=(6.5, 4))
    for label, values in accuracy.items():
        ax.plot(steps_by_run[label], values, label=label, lw=1.6)
    if reference is not None:
        ax.axhline(reference, color="k", lw=0.8, ls="--", label="Inception's best")
    ax.set_xlabel("training steps")
    ax.set_ylabel("test accuracy")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def plot_tracked_inputs(steps: Sequence[int], quantiles: dict[str, np.ndarray], path: Path, *, unit: int) -> Path:
    """`train --track-inputs`: one panel per tracked nonlinearity, its input's percentiles."""
    fig, axes = _pyplot().subplots(1, len(quantiles), figsize=(4.2 * len(quantiles), 3.4), squeeze=False)
    for ax, (name, q) in zip(axes[0], quantiles.items()):
        draw_percentiles(ax, steps, q)
        ax.set_title(f"input of {name}, feature {unit}", fontsize=9)
        ax.set_xlabel("training steps")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("15th / 50th / 85th percentile")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)
