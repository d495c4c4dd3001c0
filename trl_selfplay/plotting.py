"""Per-iteration plots of a run's `metrics.jsonl`: one PNG per run, or several runs overlaid.

Each panel is one metric that exists in at least one run (task metric, win rate, length, self-BLEU, reward margin,
IRIS α and gap D̂, ...), with the iteration on the x axis (-1 = the start model, shown as "start"). Uses matplotlib's
Agg backend (no display needed; the `plot` extra).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from trl_selfplay.evaluation.report import flatten_metrics, read_metrics

# Panels in display order: (metric key, title). Keys absent from every run are skipped.
PANELS: tuple[tuple[str, str], ...] = (
    ("accuracy", "held-out accuracy (greedy)"),
    ("sampled_accuracy", "accuracy of samples (T=1)"),
    ("win_rate", "win rate vs previous iteration"),
    ("length", "response length (tokens)"),
    ("self_bleu", "self-BLEU (lower = more diverse)"),
    ("rewards/margins", "reward margin (last logged step)"),
    ("rewards/chosen", "reward of chosen / real"),
    ("logps/chosen", "log-prob of chosen / real"),
    ("iris/alpha", "IRIS order α_t"),
    ("iris/gap", "IRIS gap D̂_t"),
    ("train/loss", "training loss (last logged step)"),
)


def _series(lines: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for line in lines:
        value = flatten_metrics(line).get(key)
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            xs.append(int(line.get("iteration", -1)))
            ys.append(float(value))
    return xs, ys


def available_panels(runs: dict[str, list[dict[str, Any]]]) -> list[tuple[str, str]]:
    """The panels of `PANELS` with at least one value in `runs`."""
    return [(key, title) for key, title in PANELS if any(_series(lines, key)[0] for lines in runs.values())]


def plot_runs(
    runs: dict[str, list[dict[str, Any]]] | dict[str, str | os.PathLike],
    path: str | os.PathLike,
    *,
    title: str | None = None,
    panels: Sequence[str] | None = None,
    columns: int = 3,
    dpi: int = 100,
    panel_size: tuple[float, float] = (4.0, 3.0),
) -> Path:
    """Draw one panel per metric, one line per run, and save a PNG.

    Args:
        runs: `{label: metrics.jsonl lines}` or `{label: run directory or metrics.jsonl path}`.
        path: the PNG to write.
        panels: metric keys to draw (default: every key of `PANELS` present in the runs).
        columns: panels per row.
        dpi, panel_size: the image is `columns * panel_size[0] * dpi` pixels wide and
            `rows * panel_size[1] * dpi` high.

    Returns:
        `path`.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loaded = {label: read_metrics(src) if isinstance(src, str | os.PathLike) else src for label, src in runs.items()}
    if panels is None:
        chosen = available_panels(loaded)
    else:
        titles = dict(PANELS)
        chosen = [(key, titles.get(key, key)) for key in panels]
    if not chosen:
        raise ValueError(f"Nothing to plot: no known metric in {sorted(loaded)} (expected keys like 'accuracy').")
    if columns < 1:
        raise ValueError(f"`columns` must be >= 1, got {columns}.")
    columns = min(columns, len(chosen))
    rows = math.ceil(len(chosen) / columns)
    fig, axes = plt.subplots(
        rows, columns, figsize=(columns * panel_size[0], rows * panel_size[1]), dpi=dpi, squeeze=False
    )
    # One colour per run across every panel, whichever runs a panel has.
    cycle = plt.rcParams["axes.prop_cycle"].by_key().get("color", ["C0"])
    colors = {label: cycle[i % len(cycle)] for i, label in enumerate(loaded)}
    handles = {}
    # The same x axis (every evaluated iteration) on every panel, so iterations line up across panels.
    ticks = sorted({int(line.get("iteration", -1)) for lines in loaded.values() for line in lines})
    for ax, (key, panel_title) in zip(axes.flat, chosen):
        for label, lines in loaded.items():
            xs, ys = _series(lines, key)
            if xs:
                (handles[label],) = ax.plot(xs, ys, marker="o", label=label, color=colors[label])
        ax.set_title(panel_title, fontsize=9)
        ax.set_xticks(ticks)
        ax.set_xticklabels(["start" if t == -1 else str(t) for t in ticks], fontsize=8)
        if len(ticks) > 1:
            ax.set_xlim(ticks[0] - 0.3, ticks[-1] + 0.3)
        ax.set_xlabel("iteration", fontsize=8)
        ax.tick_params(axis="y", labelsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(chosen) :]:
        ax.axis("off")
    if len(loaded) > 1 and handles:
        labels = [label for label in loaded if label in handles]
        fig.legend(
            [handles[label] for label in labels],
            labels,
            loc="upper center",
            ncol=min(len(labels), 6),
            fontsize=8,
            frameon=False,
        )
    # Room at the top for the title and the legend, in inches so it does not grow with the number of rows.
    top_inches = (0.3 if title else 0.0) + (0.3 if len(loaded) > 1 else 0.0)
    if title:
        fig.suptitle(title, fontsize=10, y=1 - 0.15 / fig.get_figheight())
    fig.tight_layout(rect=(0, 0, 1, 1 - top_inches / fig.get_figheight()))
    if len(loaded) > 1 and handles:
        fig.legends[0].set_bbox_to_anchor((0.5, 1 - (0.3 if title else 0.0) / fig.get_figheight()))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def plot_run(run_dir: str | os.PathLike, path: str | os.PathLike | None = None, **kwargs: Any) -> Path:
    """Plot one run from `<run_dir>/metrics.jsonl` to `<run_dir>/metrics.png` (or `path`)."""
    run_dir = Path(run_dir)
    lines = read_metrics(run_dir)
    label = str(lines[0].get("method", run_dir.name)) if lines else run_dir.name
    return plot_runs(
        {label: lines}, path or run_dir / "metrics.png", title=kwargs.pop("title", run_dir.name), **kwargs
    )
