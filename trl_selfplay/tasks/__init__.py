"""Small bundled tasks with programmatic metrics and judges, for offline demos and tests."""

from __future__ import annotations

from typing import Any

from trl_selfplay.tasks.arithmetic import ArithmeticTask

# name -> task class; a task provides `eval_prompts()`, `metric(prompts, completions)`, `metric_name`, `judge()`,
# and optionally `max_new_tokens` and `bleu_tokenize` (see `trl_selfplay.evaluation.evaluate_iteration`).
TASKS: dict[str, type] = {"arithmetic": ArithmeticTask}


def get_task(name: str, **kwargs: Any):
    """Instantiate a bundled task by name, e.g. `get_task("arithmetic", num_digits=3)`."""
    if name not in TASKS:
        raise ValueError(f"Unknown task {name!r}; bundled tasks: {sorted(TASKS)}.")
    return TASKS[name](**kwargs)


__all__ = ["TASKS", "ArithmeticTask", "get_task"]
