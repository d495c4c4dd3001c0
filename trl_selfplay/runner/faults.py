"""Fault injection for the kill-and-resume tests, kept out of production I/O.

`TRL_SELFPLAY_PAUSE_AT="<stage>@<t>"` (stage: generate, anchor_generations, judge, pairs, train, model_saved;
`train@<t>:<k>` pauses after optimizer step k, default 1) makes that stage stop at a known point, write
`<output_dir>/.paused-<stage>-<t>` and sleep, so a test can kill the run there deterministically. The jsonl stages
pause half-way through writing their file (after the stage's work, so that work is lost with the kill);
`model_saved` pauses after the trained model is saved and before its `train_metrics.json` and manifest. Unset,
nothing here does anything.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from trl_selfplay.runner.distributed import is_main

PAUSE_ENV = "TRL_SELFPLAY_PAUSE_AT"


def pause_step(stage: str, t: int) -> int | None:
    """The step at which the hook pauses `stage` of iteration t, or None."""
    where, _, step = os.environ.get(PAUSE_ENV, "").partition(":")
    return int(step or 1) if where == f"{stage}@{t}" else None


def pause(output_dir: Path, stage: str, t: int) -> None:
    """Mark the pause and wait to be killed (only when the hook targets this stage)."""
    if pause_step(stage, t) is None:
        return
    if is_main():
        (Path(output_dir) / f".paused-{stage}-{t}").write_text(str(os.getpid()))
    while True:  # killed by the test
        time.sleep(0.2)


def pausing(rows: list[dict[str, Any]], output_dir: Path, stage: str, t: int) -> Iterable[dict[str, Any]]:
    """`rows` as given, or (hook on) a generator that pauses half-way through them, i.e. mid-write."""
    if pause_step(stage, t) is None:
        return rows

    def generate() -> Iterator[dict[str, Any]]:
        for i, row in enumerate(rows):
            if i == len(rows) // 2:
                pause(output_dir, stage, t)
            yield row

    return generate()


def training_callbacks(output_dir: Path, t: int) -> list[Any]:
    """A Trainer callback that pauses after optimizer step k of iteration t (before that step's checkpoint)."""
    step = pause_step("train", t)
    if step is None:
        return []
    from transformers import TrainerCallback

    class PauseCallback(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= step:
                pause(output_dir, "train", t)

    return [PauseCallback()]
