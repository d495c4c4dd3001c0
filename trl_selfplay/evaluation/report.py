"""Reading a run's `metrics.jsonl` and printing it as a table, one row per (run, iteration)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["DEFAULT_COLUMNS", "flatten_metrics", "format_summary_table", "read_metrics"]


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Lines of a `metrics.jsonl` (a file, or a run directory containing one)."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def flatten_metrics(record: dict[str, Any]) -> dict[str, Any]:
    """One metrics.jsonl line → flat `{key: value}`: evaluation keys bare (`accuracy`, `win_rate`), training keys
    prefixed `train/` (`train/loss`) unless already namespaced (`rewards/margins`, `iris/alpha`); an evaluation key
    wins over a training key of the same flat name. The line's `iteration` is not included."""
    flat: dict[str, Any] = {}
    for key, value in (record.get("train") or {}).items():
        flat[key if "/" in key else f"train/{key}"] = value
    for key, value in (record.get("eval") or {}).items():
        if key != "iteration":
            flat[key] = value
    return flat


DEFAULT_COLUMNS = (
    "accuracy",
    "sampled_accuracy",
    "win_rate",
    "length",
    "self_bleu",
    "rewards/margins",
    "iris/alpha",
    "iris/gap",
)


def format_summary_table(
    runs: dict[str, list[dict[str, Any]]] | list[dict[str, Any]],
    columns: Sequence[str] | None = None,
    formatter: Callable[[Any], str] | None = None,
) -> str:
    """A plain-text table, one row per (run, iteration), of the metrics present in the runs' metrics.jsonl lines.

    Args:
        runs: `{run name: metrics.jsonl lines}` or the lines of a single run.
        columns: metric keys to show (eval keys such as `accuracy`, train keys such as `rewards/margins`); default:
            those of `DEFAULT_COLUMNS` present in at least one line.
    """
    if isinstance(runs, list):
        runs = {"run": runs}
    rows = []
    for name, lines in runs.items():
        for line in lines:
            t = line.get("iteration", -1)
            rows.append((name, "start" if t == -1 else str(t), flatten_metrics(line)))
    if columns is None:
        columns = [c for c in DEFAULT_COLUMNS if any(c in flat for _, _, flat in rows)]
    fmt = formatter or (lambda v: f"{v:.3f}" if isinstance(v, float) else str(v))
    header = ["run", "iteration", *columns]
    table = [header] + [[name, it, *(fmt(flat[c]) if c in flat else "-" for c in columns)] for name, it, flat in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines_out = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in table]
    lines_out.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines_out)
