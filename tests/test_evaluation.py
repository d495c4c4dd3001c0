"""Evaluation: BLEU / self-BLEU against hand-worked values, win rate under a hand-made judge, the runner's hook and
its cache of greedy answers, report tables."""

import json
import math
from pathlib import Path

import pytest
import torch

from trl_selfplay.evaluation import (
    BENCHMARKS,
    CompletionCache,
    bleu,
    evaluate_iteration,
    flatten_metrics,
    format_summary_table,
    lm_eval_arguments,
    run_lm_eval,
    self_bleu,
    win_rate,
)


def test_bleu_hand_worked():
    # p1 = 5/6, p2 = 3/5, p3 = 1/4, p4 = 0 -> smoothed 0.1/3; equal lengths so no brevity penalty.
    expected = (5 / 6 * 3 / 5 * 1 / 4 * (0.1 / 3)) ** 0.25
    assert bleu("the cat sat on the mat", ["the cat is on the mat"]) == pytest.approx(expected)
    assert expected == pytest.approx(0.2541, abs=1e-4)
    assert bleu("the cat sat on the mat", ["the cat sat on the mat"]) == pytest.approx(1.0)


def test_bleu_brevity_penalty_and_clipping():
    # Two 1- and 2-gram matches, 3/4-grams undefined for a 2-token hypothesis; BP = exp(1 - 4/2).
    assert bleu("the cat", ["the cat sat on"]) == pytest.approx(math.exp(-1))
    # "the the the" against "the cat": clipped unigram precision 1/3, bigram 0 -> smoothed 0.1/2, trigram 0 -> 0.1/1.
    expected = (1 / 3 * 0.1 / 2 * 0.1) ** (1 / 3)
    assert bleu("the the the", ["the cat"], max_order=3) == pytest.approx(expected)
    # The closest reference length sets the brevity penalty, the best count per n-gram clips.
    assert bleu("a b c", ["a b c d e f", "a b c"]) == pytest.approx(1.0)


def test_self_bleu_hand_worked():
    # chars "123" vs "124": p1 = 2/3, p2 = 1/2, p3 = 0 -> 0.1; symmetric, so self-BLEU is that BLEU.
    pair = (2 / 3 * 1 / 2 * 0.1) ** (1 / 3)
    assert self_bleu([["123", "124"]], tokenize="char") == pytest.approx(pair)
    # Identical samples: 1; averaged over prompts; single-sample prompts are skipped.
    assert self_bleu([["1 2", "1 2"], ["x"], ["123", "124"]], tokenize="char") == pytest.approx((1 + pair) / 2)
    assert math.isnan(self_bleu([["only one"]]))
    # More diverse sets score lower.
    assert self_bleu([["a b c d", "a b c d", "a b c d"]]) > self_bleu([["a b c d", "e f g h", "a b x y"]])


class _HandJudge:
    """P(current ≻ previous) fixed per prompt."""

    def __init__(self, probs):
        self.probs = probs
        self.calls = []

    def preference_matrix(self, prompts, completions):
        self.calls.append((prompts, completions))
        out = torch.full((len(prompts), 2, 2), 0.5)
        for n, p in enumerate(self.probs):
            out[n, 0, 1], out[n, 1, 0] = p, 1 - p
        return out


def test_win_rate_hand_made_judge():
    judge = _HandJudge([0.9, 0.5, 0.2, 0.6])
    result = win_rate(judge, ["a", "b", "c", "d"], ["c1", "c2", "c3", "c4"], ["p1", "p2", "p3", "p4"])
    assert result["win_rate"] == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    assert result["win_prob"] == pytest.approx((0.9 + 0.5 + 0.2 + 0.6) / 4)
    assert result["tie_rate"] == pytest.approx(0.25)
    # current first, previous second
    assert judge.calls[0][1][0] == ["c1", "p1"]
    with pytest.raises(ValueError, match="same length"):
        win_rate(judge, ["a"], ["c1", "c2"], ["p1"])


def test_win_rate_with_the_addition_judge():
    from trl_selfplay.tasks.arithmetic import ArithmeticTask

    judge = ArithmeticTask(num_train=0, num_eval=0).judge()
    # correct beats wrong, equal answers tie, wrong loses to correct
    result = win_rate(judge, ["1+1=", "2+2=", "3+3="], ["2", "4", "7"], ["3", "4", "6"])
    assert result["win_rate"] == pytest.approx(0.5)
    assert result["tie_rate"] == pytest.approx(1 / 3)


def test_lm_eval_arguments_group_by_few_shot():
    calls = lm_eval_arguments("org/model", "spin", limit=10)
    by_shots = {c["num_fewshot"]: c["tasks"] for c in calls}
    assert by_shots == {
        25: ["arc_challenge"],
        10: ["hellaswag"],
        0: ["truthfulqa_mc2"],
        5: ["mmlu", "winogrande", "gsm8k"],
    }
    assert all(c["model"] == "hf" and c["model_args"].startswith("pretrained=org/model") for c in calls)
    assert all(c["limit"] == 10 for c in calls)
    assert len(BENCHMARKS["iris"]) == 10
    single = lm_eval_arguments("m", ["gsm8k", "ifeval"], num_fewshot=3)
    assert single == [{**single[0], "tasks": ["gsm8k", "ifeval"], "num_fewshot": 3}]
    with pytest.raises(ValueError, match="lm_eval_tasks"):
        lm_eval_arguments("m", "open_llm")


def test_run_lm_eval_without_the_extra_says_how_to_install():
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r"trl_selfplay\[eval\]"):
            run_lm_eval("m", ["gsm8k"])
    else:
        pytest.skip("lm_eval is installed; the missing-extra message cannot be observed")


def test_summary_table_lists_iterations_and_present_columns():
    lines = [
        {"iteration": -1, "train": {}, "eval": {"accuracy": 0.25, "length": 4.0}},
        {
            "iteration": 0,
            "train": {"rewards/margins": 1.5},
            "eval": {"accuracy": 0.5, "win_rate": 0.75, "length": 4.0},
        },
    ]
    table = format_summary_table({"spin": lines})
    rows = table.splitlines()
    assert rows[0].split() == ["run", "iteration", "accuracy", "win_rate", "length", "rewards/margins"]
    assert rows[2].split() == ["spin", "start", "0.250", "-", "4.000", "-"]
    assert rows[3].split() == ["spin", "0", "0.500", "0.750", "4.000", "1.500"]


def test_flatten_metrics_namespaces_train_keys():
    line = {
        "iteration": 2,
        "train": {"loss": 0.7, "rewards/margins": 1.5, "iris/alpha": 2.0},
        "eval": {"iteration": 2, "accuracy": 0.5},
    }
    assert flatten_metrics(line) == {"train/loss": 0.7, "rewards/margins": 1.5, "iris/alpha": 2.0, "accuracy": 0.5}
    assert flatten_metrics({"iteration": -1}) == {}


@pytest.fixture(scope="module")
def addition_model(tmp_path_factory):
    from trl_selfplay.tasks.arithmetic import make_arithmetic_model

    return str(make_arithmetic_model(tmp_path_factory.mktemp("add"), hidden_size=32, num_hidden_layers=1))


def test_evaluate_iteration_on_a_model(addition_model, tmp_path):
    from trl_selfplay.tasks.arithmetic import exact_match, parse_addition

    common = dict(
        task="arithmetic",
        task_kwargs={"num_digits": 2, "num_train": 10, "num_eval": 12},
        prompt_template="{prompt}",
        diversity_prompts=3,
        diversity_samples=3,
        generation={"temperature": 1.0},
    )
    start = evaluate_iteration(addition_model, iteration=-1, output_dir=tmp_path / "a", **common)
    assert "win_rate" not in start  # no previous model
    rows = [json.loads(line) for line in open(tmp_path / "a" / "eval_completions.jsonl")]
    assert len(rows) == start["num_eval_prompts"] == 12
    answers = [str(parse_addition(r["prompt"])) for r in rows]
    assert start["accuracy"] == exact_match([r["completion"] for r in rows], answers)
    assert 1 <= start["length"] <= 2 + 3  # the task's max_new_tokens
    assert 0.0 <= start["self_bleu"] <= 1.0
    # Against itself under the task's judge, greedy answers are identical: every prompt is a tie.
    again = evaluate_iteration(addition_model, previous_model_name_or_path=addition_model, iteration=0, **common)
    assert again["win_rate"] == 0.5 and again["tie_rate"] == 1.0
    assert again["accuracy"] == start["accuracy"]


def test_previous_answers_come_from_the_cache_until_the_checkpoint_changes(addition_model, tmp_path):
    import os
    import shutil

    from trl_selfplay.tasks import get_task

    task_kwargs = {"num_digits": 2, "num_train": 10, "num_eval": 12}
    task = get_task("arithmetic", **task_kwargs)
    previous = str(shutil.copytree(addition_model, tmp_path / "previous"))
    cache = CompletionCache()
    common = dict(task="arithmetic", task_kwargs=task_kwargs, prompt_template="{prompt}", diversity_prompts=0)
    settings = dict(prompt_template="{prompt}", max_new_tokens=task.max_new_tokens)

    first = evaluate_iteration(addition_model, cache=cache, output_dir=tmp_path / "a", **common)
    answers = [json.loads(line)["completion"] for line in open(tmp_path / "a" / "eval_completions.jsonl")]
    assert cache.get(cache.key(addition_model, task.eval_prompts(), **settings)) == answers
    assert len(cache) == 1

    # Store the correct sums as the previous checkpoint's answers: the win rate must be judged against them (the
    # previous model itself, a copy of this one, would tie everywhere).
    key = cache.key(previous, task.eval_prompts(), **settings)
    cache.put(key, [example["answer"] for example in task.eval_examples()])
    cached = evaluate_iteration(addition_model, previous_model_name_or_path=previous, cache=cache, **common)
    assert first["accuracy"] < 1.0
    assert cached["win_rate"] == pytest.approx(first["accuracy"] / 2)  # ties where right, losses where wrong

    # A checkpoint saved again at the same path is another model: its answers are generated, not reused.
    weights = next(p for p in (Path(previous) / n for n in ("model.safetensors", "pytorch_model.bin")) if p.exists())
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert cache.key(previous, task.eval_prompts(), **settings) != key
    fresh = evaluate_iteration(addition_model, previous_model_name_or_path=previous, cache=cache, **common)
    assert fresh["win_rate"] == 0.5 and fresh["tie_rate"] == 1.0


def test_evaluate_iteration_needs_prompts_or_task(addition_model):
    with pytest.raises(ValueError, match="`task`"):
        evaluate_iteration(addition_model)


def test_evaluate_script_compares_consecutive_checkpoints(addition_model, tmp_path):
    import importlib.util

    script = Path(__file__).resolve().parent.parent / "scripts" / "evaluate.py"
    spec = importlib.util.spec_from_file_location("evaluate_script", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "eval.jsonl"
    args = [addition_model, addition_model, "--task", "arithmetic", "--task-kwargs", '{"num_eval": 8}']
    assert module.main([*args, "--prompt-template", "{prompt}", "--diversity-prompts", "0", "--output", str(out)]) == 0
    first, second = (json.loads(line) for line in open(out))
    assert (first["iteration"], second["iteration"]) == (-1, 0)
    assert "win_rate" not in first["eval"] and second["eval"]["tie_rate"] == 1.0  # same model: identical answers
    assert "self_bleu" not in second["eval"]  # --diversity-prompts 0 disables it
