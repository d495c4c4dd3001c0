"""Per-iteration evaluation: task metric, win rate against the previous iteration, length, self-BLEU diversity.

`evaluate_iteration` is the loop's default evaluation hook (recipe section `evaluation:`) and is usable on its own
(`scripts/evaluate.py`). Everything but the optional lm-evaluation-harness hook runs offline on CPU.

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

import json
import math
import os
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "BENCHMARKS",
    "bleu",
    "evaluate_iteration",
    "format_summary_table",
    "lm_eval_arguments",
    "read_metrics",
    "run_lm_eval",
    "self_bleu",
    "win_rate",
]

# ----------------------------------------------------------------------------------------------------- BLEU


def _tokenize(text: str, tokenize: str) -> list[str]:
    if tokenize == "whitespace":
        return text.split()
    if tokenize == "char":
        return [c for c in text if not c.isspace()]
    raise ValueError(f"`tokenize` must be 'whitespace' or 'char', got {tokenize!r}.")


def _ngrams(tokens: Sequence[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def bleu(
    hypothesis: str,
    references: Sequence[str],
    *,
    max_order: int = 4,
    tokenize: str = "whitespace",
    smoothing_epsilon: float = 0.1,
) -> float:
    """Sentence BLEU (Papineni et al. 2002) of one hypothesis against one or more references.

    Modified n-gram precisions p_n (hypothesis counts clipped by the largest count in any single reference),
    geometric mean with uniform weights over n = 1..max_order, brevity penalty against the reference length
    closest to the hypothesis length (ties: the shorter). An order with no matching n-gram gets
    `smoothing_epsilon / total` (Chen & Cherry 2014, method 1) so one missing order does not zero the score; an order
    the hypothesis is too short to contain is left out of the mean. Returns a value in [0, 1].
    """
    if max_order < 1:
        raise ValueError(f"`max_order` must be >= 1, got {max_order}.")
    if not references:
        raise ValueError("`references` must contain at least one string.")
    hyp = _tokenize(hypothesis, tokenize)
    refs = [_tokenize(r, tokenize) for r in references]
    if not hyp:
        return 0.0
    log_precisions = []
    for n in range(1, max_order + 1):
        hyp_counts = _ngrams(hyp, n)
        total = sum(hyp_counts.values())
        if total == 0:
            break  # hypothesis shorter than n: higher orders are undefined, not zero
        max_ref: Counter = Counter()
        for ref in refs:
            for gram, count in _ngrams(ref, n).items():
                max_ref[gram] = max(max_ref[gram], count)
        matches = sum(min(count, max_ref[gram]) for gram, count in hyp_counts.items())
        precision = matches / total if matches > 0 else smoothing_epsilon / total
        log_precisions.append(math.log(precision))
    ref_len = min((len(r) for r in refs), key=lambda length: (abs(length - len(hyp)), length))
    brevity = 1.0 if len(hyp) > ref_len else math.exp(1 - ref_len / len(hyp))
    return brevity * math.exp(sum(log_precisions) / len(log_precisions))


def self_bleu(
    samples: Sequence[Sequence[str]],
    *,
    max_order: int = 4,
    tokenize: str = "whitespace",
    smoothing_epsilon: float = 0.1,
) -> float:
    """Self-BLEU (Zhu et al. 2018), the diversity measure of the RSPO paper's Table 3: lower is more diverse.

    For each prompt's samples, the BLEU of every sample against the other samples of the same prompt as
    references, averaged over samples and then over prompts. Prompts with fewer than two samples are skipped;
    `nan` when no prompt has two.
    """
    scores = []
    for group in samples:
        if len(group) < 2:
            continue
        per_sample = [
            bleu(
                group[i],
                [group[j] for j in range(len(group)) if j != i],
                max_order=max_order,
                tokenize=tokenize,
                smoothing_epsilon=smoothing_epsilon,
            )
            for i in range(len(group))
        ]
        scores.append(sum(per_sample) / len(per_sample))
    return sum(scores) / len(scores) if scores else float("nan")


# ------------------------------------------------------------------------------------------------- win rate


def win_rate(judge: Any, prompts: Sequence[str], current: Sequence[str], previous: Sequence[str]) -> dict[str, float]:
    """Win rate of `current` against `previous` (one completion each per prompt) under a pairwise judge.

    `judge.preference_matrix(prompts, [[current_n, previous_n], ...])[n, 0, 1]` is P(current ≻ previous | x_n).

    Returns:
        `win_rate`: fraction of prompts where the judge prefers the current completion (P > ½), ties (P = ½, e.g.
        identical answers) counting half — the discrete rate AlpacaEval-style tables report;
        `win_prob`: mean of P, the judge's expected preference;
        `tie_rate`: fraction of exact ties.
    """
    if not (len(prompts) == len(current) == len(previous)):
        raise ValueError(
            f"`prompts` ({len(prompts)}), `current` ({len(current)}) and `previous` ({len(previous)}) must have the "
            "same length: one completion of each model per prompt."
        )
    if not prompts:
        return {"win_rate": float("nan"), "win_prob": float("nan"), "tie_rate": float("nan")}
    matrix = judge.preference_matrix(list(prompts), [[c, p] for c, p in zip(current, previous)])
    probs = [float(matrix[n][0][1]) for n in range(len(prompts))]
    ties = [abs(p - 0.5) < 1e-9 for p in probs]
    wins = [0.5 if tie else float(p > 0.5) for p, tie in zip(probs, ties)]
    return {
        "win_rate": sum(wins) / len(wins),
        "win_prob": sum(probs) / len(probs),
        "tie_rate": sum(ties) / len(ties),
    }


# ----------------------------------------------------------------------------------------- the loop's hook

# Greedy completions of models already evaluated in this process: the previous iteration's answers are reused for
# the win rate instead of being generated again. Keyed by model path and everything that shapes the answers.
_COMPLETION_CACHE: dict[tuple, list[str]] = {}


def _cache_key(model: str, prompts: Sequence[str], prompt_template: str | None, max_new_tokens: int) -> tuple:
    path = Path(model)
    stamp = None
    for name in ("model.safetensors", "pytorch_model.bin", "config.json"):
        if (path / name).exists():
            stamp = (path / name).stat().st_mtime_ns
            break
    return (
        str(path.resolve()) if path.exists() else model,
        stamp,
        hash(tuple(prompts)),
        prompt_template,
        max_new_tokens,
    )


def _greedy(model, tokenizer, prompts, prompt_template, max_new_tokens, batch_size, backend, key, backend_kwargs):
    from trl_selfplay.generation import generate_completions

    if key is not None and key in _COMPLETION_CACHE:
        return _COMPLETION_CACHE[key], None
    out = generate_completions(
        model,
        prompts,
        tokenizer=tokenizer,
        backend=backend,
        num_samples=1,
        temperature=0.0,
        max_new_tokens=max_new_tokens,
        prompt_template=prompt_template,
        batch_size=batch_size,
        **backend_kwargs,
    )
    completions = [c[0] for c in out.completions]
    if key is not None:
        _COMPLETION_CACHE[key] = completions
    return completions, [n[0] for n in out.num_tokens]


def _load(model_name_or_path: str, backend: str):
    """(model, tokenizer) for generation: loaded once on the best device for the transformers backend; the path
    itself for vLLM, which loads it."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_name_or_path)
    if backend == "vllm":
        return model_name_or_path, tokenizer
    import torch
    from transformers import AutoModelForCausalLM

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = "auto" if device.type == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_name_or_path, dtype=dtype).to(device)
    model.eval()
    return model, tokenizer


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
) -> dict[str, Any]:
    """Evaluate one checkpoint; the loop calls it for the start model (`iteration=-1`) and after every iteration.

    Signature contract with `trl_selfplay.loop` (see `trl_selfplay.recipes`): the loop passes
    `model_name_or_path`, `previous_model_name_or_path`, `iteration`, `output_dir`, `prompt_template`, `judge`
    (the recipe's judge object, or None), `generation` (the recipe's generation section as a dict) and `seed`; the
    other arguments come from the recipe's `evaluation:` section.

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
        iteration: the loop's iteration index (-1 for the start model); only recorded.
        output_dir: where `eval_completions.jsonl` (the prompts and answers, for inspection) is written.
        prompt_template: how prompts are formatted for generation (`None`: chat template), as in training.
        judge: an object with `preference_matrix(prompts, completions)` (e.g. `RewardFunctionJudge`).
        generation: the recipe's generation settings (`backend`, `temperature`, `top_p`, `max_new_tokens`).
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
    """
    from trl_selfplay.generation import generate_completions
    from trl_selfplay.tasks import get_task

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

    model, tokenizer = _load(model_name_or_path, backend)
    key = _cache_key(model_name_or_path, eval_prompts, prompt_template, max_new_tokens)
    _COMPLETION_CACHE.pop(key, None)  # always measure the evaluated model afresh (and its lengths)
    completions, num_tokens = _greedy(
        model, tokenizer, eval_prompts, prompt_template, max_new_tokens, batch_size, backend, key, backend_kwargs
    )
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
            backend=backend,
            num_samples=diversity_samples,
            temperature=temperature,
            top_p=float(generation.get("top_p", 1.0)),
            max_new_tokens=max_new_tokens,
            seed=seed,
            prompt_template=prompt_template,
            batch_size=batch_size,
            **backend_kwargs,
        )
        metrics["self_bleu"] = self_bleu(sampled.completions, tokenize=bleu_tokenize)
        if task_obj is not None:
            flat_prompts = [p for p, group in zip(eval_prompts, sampled.completions) for _ in group]
            flat = [c for group in sampled.completions for c in group]
            metrics[f"sampled_{task_obj.metric_name}"] = task_obj.metric(flat_prompts, flat)
    del model

    if previous_model_name_or_path is not None and judge is not None:
        previous_key = _cache_key(previous_model_name_or_path, eval_prompts, prompt_template, max_new_tokens)
        if previous_key in _COMPLETION_CACHE:
            previous = _COMPLETION_CACHE[previous_key]
        else:
            previous_model, previous_tokenizer = _load(previous_model_name_or_path, backend)
            previous, _ = _greedy(
                previous_model,
                previous_tokenizer,
                eval_prompts,
                prompt_template,
                max_new_tokens,
                batch_size,
                backend,
                previous_key,
                backend_kwargs,
            )
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


# ------------------------------------------------------------------------------------ lm-evaluation-harness

# The papers' benchmark lists as lm-evaluation-harness (0.4) task names, with the few-shot counts they used.
# SPIN reports the (v1) Open LLM Leaderboard; IRIS reports ten benchmarks, several from the v2 leaderboard, whose
# harness tasks (`leaderboard_*`) fix their own few-shot settings (None = the task's default).
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


# -------------------------------------------------------------------------------------------- summary table


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Lines of a `metrics.jsonl` (a file, or a run directory containing one)."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _flatten(record: dict[str, Any]) -> dict[str, Any]:
    """One metrics.jsonl line → flat `{key: value}` (eval keys bare, train keys prefixed `train/` unless they are
    already namespaced like `iris/alpha`)."""
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
            rows.append((name, "start" if t == -1 else str(t), _flatten(line)))
    if columns is None:
        columns = [c for c in DEFAULT_COLUMNS if any(c in flat for _, _, flat in rows)]
    fmt = formatter or (lambda v: f"{v:.3f}" if isinstance(v, float) else str(v))
    header = ["run", "iteration", *columns]
    table = [header] + [[name, it, *(fmt(flat[c]) if c in flat else "-" for c in columns)] for name, it, flat in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines_out = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in table]
    lines_out.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines_out)
