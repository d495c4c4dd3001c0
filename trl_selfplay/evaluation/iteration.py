"""`evaluate_iteration`: the runner's per-iteration evaluation hook, and the cache of greedy completions it reuses.

Recipe example (every key but `function` is a keyword argument of `evaluate_iteration`)::

    evaluation:
      function: trl_selfplay.evaluation:evaluate_iteration   # the default
      task: arithmetic                                       # see trl_selfplay.tasks.TASKS
      task_kwargs: {num_digits: 3, num_eval: 200}
      judge_function: trl_selfplay.tasks.arithmetic:addition_score   # when the recipe has no `judge`
      diversity_prompts: 50
      diversity_samples: 4
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any

from trl_selfplay.evaluation.harness import run_lm_eval
from trl_selfplay.evaluation.metrics import self_bleu, win_rate
from trl_selfplay.generation import generate_completions
from trl_selfplay.generation.prompts import Prompt
from trl_selfplay.models import default_device, default_dtype, load_causal_lm, load_tokenizer

__all__ = ["COMPLETION_CACHE", "CompletionCache", "evaluate_iteration"]


class CompletionCache:
    """Greedy completions of checkpoints already evaluated in this process.

    After iteration t is evaluated, iteration t + 1's win rate needs π_{t+1}'s answers, already generated then: they
    are reused instead of generated again. An entry is keyed by the checkpoint (its resolved path and the
    modification time of its weights, so a checkpoint saved again at the same path is a new entry) and by everything
    that shapes greedy answers: the prompts, the prompt template, `add_special_tokens` and `max_new_tokens`.
    """

    def __init__(self) -> None:
        self._entries: dict[Hashable, list[str]] = {}

    @staticmethod
    def key(
        model_name_or_path: str,
        prompts: Sequence[Prompt],
        *,
        prompt_template: str | None,
        max_new_tokens: int,
        add_special_tokens: bool | None = None,
    ) -> Hashable:
        """The entry of `model_name_or_path`'s greedy completions of `prompts` under these settings."""
        path = Path(model_name_or_path)
        stamp = None
        for name in ("model.safetensors", "pytorch_model.bin", "config.json"):
            if (path / name).exists():
                stamp = (path / name).stat().st_mtime_ns
                break
        digest = hashlib.sha256(json.dumps(list(prompts), sort_keys=True).encode()).hexdigest()
        model_id = str(path.resolve()) if path.exists() else model_name_or_path
        return (model_id, stamp, digest, prompt_template, add_special_tokens, max_new_tokens)

    def get(self, key: Hashable) -> list[str] | None:
        """The completions stored under `key`, or None."""
        return self._entries.get(key)

    def put(self, key: Hashable, completions: Sequence[str]) -> None:
        self._entries[key] = list(completions)

    def discard(self, key: Hashable) -> None:
        self._entries.pop(key, None)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


# The process-wide cache `evaluate_iteration` uses by default (the runner calls it once per iteration).
COMPLETION_CACHE = CompletionCache()


def _load_for_generation(model_name_or_path: str, backend: str) -> tuple[Any, Any]:
    """(model, tokenizer): the model loaded once on the best device for the transformers backend (float32 on the
    CPU); the path itself for vLLM, which loads it."""
    tokenizer = load_tokenizer(model_name_or_path)
    if backend == "vllm":
        return model_name_or_path, tokenizer
    device = default_device()
    return load_causal_lm(model_name_or_path, dtype=default_dtype(device), device=device), tokenizer


def evaluate_iteration(
    model_name_or_path: str,
    *,
    previous_model_name_or_path: str | None = None,
    iteration: int = -1,
    output_dir: str | os.PathLike | None = None,
    prompt_template: str | None = None,
    judge: Any = None,
    generation: dict[str, Any] | None = None,
    seed: int = 0,
    task: str | None = None,
    task_kwargs: dict[str, Any] | None = None,
    prompts: list[str] | None = None,
    num_prompts: int | None = None,
    judge_function: str | None = None,
    judge_kind: str = "reward",
    max_new_tokens: int | None = None,
    diversity_prompts: int = 50,
    diversity_samples: int = 4,
    diversity_temperature: float | None = None,
    bleu_tokenize: str | None = None,
    batch_size: int = 64,
    lm_eval_tasks: list[str] | str | None = None,
    lm_eval_kwargs: dict[str, Any] | None = None,
    cache: CompletionCache | None = None,
) -> dict[str, Any]:
    """Evaluate one checkpoint; the runner calls it for the start model (`iteration=-1`) and after every iteration.

    Signature contract with the runner: it passes `model_name_or_path`, `previous_model_name_or_path`,
    `iteration`, `output_dir`, `prompt_template`, `judge` (the recipe's judge object, or None), `generation` (the
    recipe's generation section as a dict) and `seed`; the other arguments come from the recipe's `evaluation:`
    section.

    Metrics (keys of the returned dict, all JSON-serialisable):
        `<metric>` (e.g. `accuracy`): the task metric of greedy completions on the task's held-out prompts
            (only with `task`);
        `win_rate`, `win_prob`, `tie_rate`: greedy completions of this model against the previous model's, under
            `judge` (or `judge_function`); absent for the start model or without a judge;
        `length`: mean number of generated tokens of the greedy completions (end-of-sequence token included);
        `self_bleu`: self-BLEU of `diversity_samples` sampled completions on the first `diversity_prompts`
            prompts (lower = more diverse; sampled at the recipe's generation temperature);
        `lm_eval/<task>/<metric>`: with `lm_eval_tasks` (needs the `eval` extra), see `run_lm_eval`.

    Args:
        model_name_or_path: the checkpoint to evaluate.
        previous_model_name_or_path: the checkpoint of the previous iteration (for the win rate).
        iteration: the runner's iteration index (-1 for the start model); only recorded.
        output_dir: where `eval_completions.jsonl` (the prompts and answers, for inspection) is written.
        prompt_template: how prompts are formatted for generation (`None`: chat template), as in training.
        judge: an object with `preference_matrix(prompts, completions)` (e.g. `RewardFunctionJudge`).
        generation: the recipe's generation settings (`backend`, `backend_kwargs`, `temperature`, `top_p`,
            `max_new_tokens`, `add_special_tokens`); prompts are tokenised as generation tokenises them.
        seed: sampling seed of the diversity samples.
        task: a bundled task name (`trl_selfplay.tasks.TASKS`) giving held-out prompts, metric and default judge.
        task_kwargs: keyword arguments of the task class (e.g. `{num_digits: 3, num_eval: 200}`).
        prompts: evaluation prompts when there is no task (e.g. a held-out slice of the user's data).
        num_prompts: evaluate on the first N prompts only.
        judge_function: `"module:function"` with `fn(prompt, completion) -> float` (or a pairwise function, see
            `judge_kind`) used when `judge` is None; a task provides its own by default.
        judge_kind: `"reward"` or `"pairwise"`, as in `RewardFunctionJudge`.
        max_new_tokens: generation budget; default: the task's, else `generation["max_new_tokens"]`, else 256.
        diversity_prompts, diversity_samples: size of the self-BLEU measurement (0 disables it).
        diversity_temperature: default `generation["temperature"]`, else 1.0.
        bleu_tokenize: `"whitespace"` or `"char"`; default: the task's, else whitespace.
        batch_size: generation batch size.
        lm_eval_tasks: lm-evaluation-harness task names, or a preset of `BENCHMARKS` (`"spin"`, `"iris"`).
        lm_eval_kwargs: extra keyword arguments of `run_lm_eval` (`limit`, `batch_size`, `device`, ...).
        cache: where greedy completions are kept for the next call (default: the process-wide `COMPLETION_CACHE`).
    """
    from trl_selfplay.tasks import get_task

    cache = COMPLETION_CACHE if cache is None else cache
    generation = dict(generation or {})
    task_obj = get_task(task, **(task_kwargs or {})) if task is not None else None
    if task_obj is None and prompts is None:
        raise ValueError("evaluate_iteration needs `task` (a bundled task name) or `prompts` (a list of strings).")
    if diversity_prompts < 0 or diversity_samples < 0:
        raise ValueError("`diversity_prompts` and `diversity_samples` must be >= 0 (0 disables self-BLEU).")
    eval_prompts = list(prompts) if prompts is not None else task_obj.eval_prompts()
    if num_prompts is not None:
        eval_prompts = eval_prompts[:num_prompts]
    if not eval_prompts:
        raise ValueError("No evaluation prompts: `prompts` is empty or `num_prompts` is 0.")
    if max_new_tokens is None:
        max_new_tokens = getattr(task_obj, "max_new_tokens", None) or int(generation.get("max_new_tokens", 256))
    if bleu_tokenize is None:
        bleu_tokenize = getattr(task_obj, "bleu_tokenize", "whitespace")
    if judge is None:
        if judge_function is not None:
            from trl_selfplay.judges import RewardFunctionJudge
            from trl_selfplay.recipes import import_callable

            judge = RewardFunctionJudge(import_callable(judge_function, "evaluation.judge_function"), kind=judge_kind)
        elif task_obj is not None:
            judge = task_obj.judge()
    backend = generation.get("backend", "transformers")
    backend_kwargs = dict(generation.get("backend_kwargs") or {}) if backend == "vllm" else {}
    add_special_tokens = generation.get("add_special_tokens")
    shared = {
        "backend": backend,
        "max_new_tokens": max_new_tokens,
        "prompt_template": prompt_template,
        "add_special_tokens": add_special_tokens,
        "batch_size": batch_size,
        **backend_kwargs,
    }

    def cache_key(path: str) -> Hashable:
        return cache.key(
            path,
            eval_prompts,
            prompt_template=prompt_template,
            max_new_tokens=max_new_tokens,
            add_special_tokens=add_special_tokens,
        )

    def greedy(model: Any, tokenizer: Any, key: Hashable) -> tuple[list[str], list[int]]:
        out = generate_completions(model, eval_prompts, tokenizer=tokenizer, num_samples=1, temperature=0.0, **shared)
        completions = [c[0] for c in out.completions]
        cache.put(key, completions)
        return completions, [n[0] for n in out.num_tokens]

    # The evaluated model is always measured afresh (its lengths are needed too); its answers are then cached.
    model, tokenizer = _load_for_generation(model_name_or_path, backend)
    completions, num_tokens = greedy(model, tokenizer, cache_key(model_name_or_path))
    metrics: dict[str, Any] = {"iteration": iteration, "num_eval_prompts": len(eval_prompts)}
    if task_obj is not None:
        metrics[task_obj.metric_name] = task_obj.metric(eval_prompts, completions)
    metrics["length"] = sum(num_tokens) / len(num_tokens)

    if diversity_prompts and diversity_samples >= 2:
        temperature = diversity_temperature
        if temperature is None:
            temperature = float(generation.get("temperature", 1.0)) or 1.0
        sampled = generate_completions(
            model,
            eval_prompts[:diversity_prompts],
            tokenizer=tokenizer,
            num_samples=diversity_samples,
            temperature=temperature,
            top_p=float(generation.get("top_p", 1.0)),
            seed=seed,
            **shared,
        )
        metrics["self_bleu"] = self_bleu(sampled.completions, tokenize=bleu_tokenize)
        if task_obj is not None:
            flat_prompts = [p for p, group in zip(eval_prompts, sampled.completions) for _ in group]
            flat = [c for group in sampled.completions for c in group]
            metrics[f"sampled_{task_obj.metric_name}"] = task_obj.metric(flat_prompts, flat)
    del model

    if previous_model_name_or_path is not None and judge is not None:
        previous_key = cache_key(previous_model_name_or_path)
        previous = cache.get(previous_key)
        if previous is None:
            previous_model, previous_tokenizer = _load_for_generation(previous_model_name_or_path, backend)
            previous, _ = greedy(previous_model, previous_tokenizer, previous_key)
            del previous_model
        metrics.update(win_rate(judge, eval_prompts, completions, previous))

    if lm_eval_tasks:
        results = run_lm_eval(model_name_or_path, lm_eval_tasks, **(lm_eval_kwargs or {}))
        for name, values in results.items():
            for metric, value in values.items():
                if isinstance(value, int | float):
                    metrics[f"lm_eval/{name}/{metric}"] = value

    if output_dir is not None:
        path = Path(output_dir)
        path.mkdir(parents=True, exist_ok=True)
        with open(path / "eval_completions.jsonl", "w") as f:
            for prompt, completion in zip(eval_prompts, completions):
                f.write(json.dumps({"prompt": prompt, "completion": completion}) + "\n")
    return metrics
