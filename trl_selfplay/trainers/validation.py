"""Checks on the trainers' datasets that run before any model is loaded: one clear `ValueError` naming the dataset,
the column, the row and the fix, instead of a traceback from deep inside tokenisation or the loss."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from datasets import Dataset

# Columns every self-play pair needs; `prompt` may be implicit (TRL extracts the shared prefix of chosen/rejected).
PAIR_COLUMNS = ("chosen", "rejected")
TEXT_COLUMNS = ("prompt", "chosen", "rejected")


def column_names(dataset) -> list[str]:
    names = getattr(dataset, "column_names", None)
    if names is None:  # an IterableDataset without known features
        names = list(next(iter(dataset)).keys())
    return list(names)


def _first_row(dataset, label: str) -> dict[str, Any]:
    try:
        return next(iter(dataset))
    except StopIteration:
        raise ValueError(f"{label} is empty (0 rows); pass a dataset with at least one pair.") from None


def check_pair_dataset(dataset, label: str, probability_columns: Sequence[str] = ()) -> None:
    """Validate a self-play dataset. `label` names it in messages (e.g. `"train_dataset"`).

    Checks: not empty; `chosen` and `rejected` present; no `None` in `prompt` / `chosen` / `rejected`; each of
    `probability_columns` (if present) numeric, without `None`, finite and in [0, 1]. A map-style `Dataset` is checked
    on every row (column-wise, through Arrow); an `IterableDataset` on its first row only.
    """
    if isinstance(dataset, Dataset) and len(dataset) == 0:
        raise ValueError(f"{label} is empty (0 rows); pass a dataset with at least one pair.")
    first = _first_row(dataset, label)
    names = column_names(dataset)
    missing = [name for name in PAIR_COLUMNS if name not in names]
    if missing:
        raise ValueError(
            f"{label} lacks the column(s) {missing} (it has {names}). Self-play trainers need `chosen` and `rejected` "
            "(and a `prompt`, unless it is the shared start of both): for SPIN/IRIS chosen = the annotated response "
            "and rejected = the model's generation; for RSPO the best- and worst-judged samples. Rename or add them."
        )
    present = [name for name in TEXT_COLUMNS if name in names]
    if isinstance(dataset, Dataset):
        table = dataset.with_format("arrow")
        for name in present:
            nulls = np.flatnonzero(table[name].is_null().to_numpy(zero_copy_only=False))
            if nulls.size:
                _raise_none(label, name, int(nulls[0]), nulls.size)
        for name in probability_columns:
            if name in names:
                _check_probability_column(dataset, table, label, name)
    else:
        for name in present:
            if first.get(name) is None:
                _raise_none(label, name, 0, None)
        for name in probability_columns:
            if name in first:
                _check_probability_value(label, name, 0, first[name])


def _raise_none(label: str, name: str, row: int, count: int | None) -> None:
    total = "" if count is None else f" ({count} row{'s' if count > 1 else ''} in all)"
    raise ValueError(
        f"{label} column `{name}` is None at row {row}{total}. Every pair needs a prompt, a chosen and a rejected "
        "response: drop or fill those rows (e.g. `dataset.filter(lambda row: row['" + name + "'] is not None)`)."
    )


def _check_probability_value(label: str, name: str, row: int, value: Any) -> None:
    if value is None:
        raise ValueError(f"{label} column `{name}` is None at row {row}; give every row a probability in [0, 1].")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(
            f"{label} column `{name}` must hold numbers, got {type(value).__name__} {value!r} at row {row}; convert "
            f"it, e.g. `dataset.cast_column('{name}', Value('float64'))`."
        )
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ValueError(
            f"{label} column `{name}` must hold probabilities in [0, 1], got {value!r} at row {row}; rescale the "
            "judge's output to [0, 1] (see `trl_selfplay.losses.win_probabilities`)."
        )


def _check_probability_column(dataset: Dataset, table, label: str, name: str) -> None:
    import pyarrow as pa

    column = table[name]
    if not (pa.types.is_floating(column.type) or pa.types.is_integer(column.type)):
        first_value = dataset[0][name]
        raise ValueError(
            f"{label} column `{name}` must hold numbers, but its type is {column.type} (row 0: {first_value!r}); "
            f"convert it, e.g. `dataset.cast_column('{name}', Value('float64'))`."
        )
    nulls = np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))
    if nulls.size:
        _check_probability_value(label, name, int(nulls[0]), None)
    values = column.to_numpy(zero_copy_only=False).astype(np.float64)
    bad = np.flatnonzero(~(np.isfinite(values) & (values >= 0.0) & (values <= 1.0)))
    if bad.size:
        _check_probability_value(label, name, int(bad[0]), float(values[bad[0]]))
