"""lm-evaluation-harness adapter: the papers' benchmark lists and the `simple_evaluate` calls that run them.

Needs the `eval` extra; not exercised offline (the harness downloads its datasets).
"""

from __future__ import annotations

from typing import Any

__all__ = ["BENCHMARKS", "lm_eval_arguments", "run_lm_eval"]

# The papers' benchmark lists as lm-evaluation-harness (0.4) task names, with the few-shot counts they used.
# SPIN reports the (v1) Open LLM Leaderboard. The IRIS list (ten benchmarks, several from the v2 leaderboard, whose
# harness tasks `leaderboard_*` fix their own few-shot settings: None = the task's default) is our assumption, not
# stated in the IRIS abstract (docs/fidelity.md).
BENCHMARKS: dict[str, dict[str, int | None]] = {
    "spin": {
        "arc_challenge": 25,
        "hellaswag": 10,
        "truthfulqa_mc2": 0,
        "mmlu": 5,
        "winogrande": 5,
        "gsm8k": 5,
    },
    "iris": {
        "gsm8k": 5,
        "leaderboard_math_hard": None,
        "leaderboard_musr": None,
        "mmlu": 5,
        "leaderboard_mmlu_pro": None,
        "leaderboard_gpqa": None,
        "hellaswag": 10,
        "winogrande": 5,
        "leaderboard_bbh": None,
        "leaderboard_ifeval": None,
    },
}


def lm_eval_arguments(
    model_name_or_path: str,
    tasks: list[str] | str,
    *,
    batch_size: int | str = "auto",
    limit: int | float | None = None,
    device: str | None = None,
    dtype: str = "auto",
    num_fewshot: int | None = None,
    apply_chat_template: bool = False,
) -> list[dict[str, Any]]:
    """Keyword arguments of the `lm_eval.simple_evaluate` calls that run `tasks` on a local or Hub checkpoint.

    `tasks` is a list of harness task names or a preset of `BENCHMARKS`. Tasks are grouped by few-shot count (one
    call per group, as `simple_evaluate` takes a single `num_fewshot`); `num_fewshot` overrides every count.
    """
    if isinstance(tasks, str):
        if tasks not in BENCHMARKS:
            raise ValueError(
                f"`lm_eval_tasks` must be a list of lm-evaluation-harness task names or one of {sorted(BENCHMARKS)}, "
                f"got {tasks!r}."
            )
        shots: dict[str, int | None] = dict(BENCHMARKS[tasks])
    else:
        if not tasks or any(not isinstance(t, str) for t in tasks):
            raise ValueError(f"`lm_eval_tasks` must be a non-empty list of task names, got {tasks!r}.")
        shots = dict.fromkeys(tasks)
    if num_fewshot is not None:
        shots = dict.fromkeys(shots, num_fewshot)
    groups: dict[int | None, list[str]] = {}
    for name, count in shots.items():
        groups.setdefault(count, []).append(name)
    model_args = f"pretrained={model_name_or_path},dtype={dtype}"
    calls = []
    for count, names in groups.items():
        call: dict[str, Any] = {
            "model": "hf",
            "model_args": model_args,
            "tasks": names,
            "num_fewshot": count,
            "batch_size": batch_size,
            "limit": limit,
            "apply_chat_template": apply_chat_template,
        }
        if device is not None:
            call["device"] = device
        calls.append(call)
    return calls


def run_lm_eval(model_name_or_path: str, tasks: list[str] | str, **kwargs: Any) -> dict[str, dict[str, Any]]:
    """Run lm-evaluation-harness on a checkpoint; returns `{task: {metric: value}}` (needs the `eval` extra).

    Not exercised offline (the harness downloads its datasets); see `lm_eval_arguments` for what is run.
    """
    calls = lm_eval_arguments(model_name_or_path, tasks, **kwargs)
    try:
        import lm_eval
    except ImportError as error:
        raise ImportError(
            "lm_eval_tasks needs lm-evaluation-harness: `pip install 'trl_selfplay[eval]'` (or `pip install lm-eval`)."
        ) from error
    results: dict[str, dict[str, Any]] = {}
    for call in calls:
        out = lm_eval.simple_evaluate(**call)
        for name, values in (out or {}).get("results", {}).items():
            results[name] = {k: v for k, v in values.items() if isinstance(v, int | float)}
    return results
