"""The bundled addition task: deterministic data, exact-match metric, programmatic judge, character tokenizer."""

import math

import pytest

from trl_selfplay.tasks import TASKS, get_task
from trl_selfplay.tasks.arithmetic import (
    ArithmeticTask,
    addition_correct,
    addition_dataset,
    addition_reward,
    addition_score,
    exact_match,
    parse_addition,
)


def test_exact_match_hand_worked():
    # strip() only: "579 " counts, "0579" and "57" do not.
    assert exact_match(["579", " 579 ", "0579", "57"], ["579"] * 4) == 0.5
    assert exact_match([], []) == 0.0
    with pytest.raises(ValueError, match="differ in length"):
        exact_match(["1"], [])


def test_task_metric_reads_the_sum_from_the_prompt():
    task = ArithmeticTask(num_digits=2, num_train=0, num_eval=0)
    assert task.metric(["12+34=", "99+1=", "5+5="], ["46", "100", "11"]) == pytest.approx(2 / 3)
    assert parse_addition("123+456=") == 579
    with pytest.raises(ValueError, match="a\\+b="):
        parse_addition("what is 1+1?")


def test_judge_prefers_correct_then_closer():
    prompt = "123+456="
    correct, near, far, garbage = (addition_score(prompt, c) for c in ("579", "578", "900", "abc"))
    assert correct == 1.0
    assert correct > near > far > garbage == 0.0
    # every wrong answer scores at most 0.5, below any correct answer
    assert near == pytest.approx(0.5 / (1 + math.log10(2)))
    assert addition_reward([prompt, "1+1="], ["579", "3"]) == [1.0, pytest.approx(0.5 / (1 + math.log10(2)))]
    # The verifier gives no credit for being close.
    assert [addition_correct(prompt, c) for c in ("579", " 579 ", "578", "0579", "abc")] == [1.0, 1.0, 0.0, 0.0, 0.0]


def test_judge_through_reward_function_judge():
    from trl_selfplay.judges import RewardFunctionJudge

    judge = ArithmeticTask(num_train=0, num_eval=0).judge()
    assert isinstance(judge, RewardFunctionJudge)
    probs = judge.preference_matrix(["2+2="], [["4", "5", "9"]])[0]
    assert probs[0, 1] > 0.5 and probs[0, 2] > probs[0, 1] and probs[1, 2] > 0.5


def test_data_is_deterministic_and_eval_is_held_out():
    a = ArithmeticTask(num_digits=3, num_train=500, num_eval=50, seed=1)
    b = ArithmeticTask(num_digits=3, num_train=500, num_eval=50, seed=1)
    assert a.train_pairs() == b.train_pairs() and a.eval_examples() == b.eval_examples()
    assert ArithmeticTask(num_digits=3, num_train=500, num_eval=50, seed=2).eval_prompts() != a.eval_prompts()
    train_prompts = {p["prompt"] for p in a.train_pairs()}
    assert len(train_prompts) == 500 and not train_prompts & set(a.eval_prompts())
    for example in a.train_pairs()[:20]:
        assert str(parse_addition(example["prompt"])) == example["completion"]
    # The held-out prompts do not depend on how much training data is drawn.
    assert ArithmeticTask(num_digits=3, num_train=100, num_eval=50, seed=1).eval_prompts() == a.eval_prompts()


def test_default_splits_cover_every_two_digit_sum_and_are_disjoint():
    task = ArithmeticTask()
    train = {p["prompt"] for p in task.train_pairs()}
    validation = {e["prompt"] for e in task.validation_examples()}
    held_out = set(task.eval_prompts())
    assert (len(train), len(validation), len(held_out)) == (10_000 - 400, 200, 200)
    assert not train & held_out and not train & validation and not validation & held_out
    assert all(str(parse_addition(e["prompt"])) == e["answer"] for e in task.validation_examples())
    assert task.max_new_tokens == 5
    # The held-out sums do not move when the validation split is resized (or removed).
    assert ArithmeticTask(num_validation=0).eval_prompts() == task.eval_prompts()
    assert len(ArithmeticTask(num_validation=0).train_pairs()) == 10_000 - 200


def test_dataset_fn_and_registry():
    train = addition_dataset("train", num_digits=2, num_train=30, num_eval=5)
    assert train.column_names == ["prompt", "completion"] and len(train) == 30
    assert addition_dataset("eval", num_digits=2, num_train=30, num_eval=5).column_names == ["prompt", "answer"]
    validation = addition_dataset("validation", num_digits=2, num_train=30, num_eval=5, num_validation=7)
    assert validation.column_names == ["prompt", "answer"] and len(validation) == 7
    with pytest.raises(ValueError, match="split"):
        addition_dataset("dev")
    assert isinstance(get_task("arithmetic", num_train=1, num_eval=1), TASKS["arithmetic"])
    with pytest.raises(ValueError, match="bundled tasks"):
        get_task("sudoku")


def test_bad_sizes_raise_before_drawing():
    with pytest.raises(ValueError, match="num_digits"):
        ArithmeticTask(num_digits=0)
    with pytest.raises(ValueError, match="distinct"):
        ArithmeticTask(num_digits=1, num_train=100, num_eval=1)
    with pytest.raises(ValueError, match="num_validation"):
        ArithmeticTask(num_digits=1, num_train=10, num_eval=1, num_validation=-1)
    with pytest.raises(ValueError, match="num_validation"):
        ArithmeticTask(num_digits=1, num_train=50, num_eval=10, num_validation=50)


def test_character_level_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    from trl_selfplay.tasks.arithmetic import make_arithmetic_model

    path = make_arithmetic_model(tmp_path / "m", hidden_size=32, num_hidden_layers=1, num_attention_heads=1)
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer("123+456=579")["input_ids"]
    assert [tokenizer.decode([i]) for i in ids] == list("123+456=579")
    assert tokenizer.eos_token == "<|im_end|>"


def test_warm_start_stops_on_the_validation_target(tmp_path):
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trl_selfplay.tasks.arithmetic import make_arithmetic_warm_start, validation_accuracy

    tiny = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 1, "num_validation": 8}
    # Target 0 is reached at the first check: training stops after `eval_steps` steps.
    first = make_arithmetic_warm_start(tmp_path / "first", target_accuracy=0.0, eval_steps=2, max_steps=6, **tiny)
    record = json.loads((first / "warm_start.json").read_text())
    assert record["steps"] == 2 and record["reached_target"] and [step for step, _ in record["curve"]] == [2]
    # An unreachable target runs to `max_steps`, measuring every `eval_steps` and once more at the end.
    last = make_arithmetic_warm_start(tmp_path / "last", target_accuracy=1.0, eval_steps=2, max_steps=5, **tiny)
    record = json.loads((last / "warm_start.json").read_text())
    assert [step for step, _ in record["curve"]] == [2, 4, 5] and record["steps"] == 5
    assert not record["reached_target"] and not (tmp_path / "last.tmp").exists()
    # The recorded accuracy is the saved model's greedy accuracy on the validation sums.
    model = AutoModelForCausalLM.from_pretrained(last)
    task = ArithmeticTask(num_validation=8)
    assert validation_accuracy(model, AutoTokenizer.from_pretrained(last), task) == record["validation_accuracy"]


def test_warm_start_rejects_bad_arguments_before_training(tmp_path):
    from trl_selfplay.tasks.arithmetic import make_arithmetic_warm_start

    with pytest.raises(ValueError, match="target_accuracy"):
        make_arithmetic_warm_start(tmp_path / "m", target_accuracy=1.5)
    with pytest.raises(ValueError, match="num_validation"):
        make_arithmetic_warm_start(tmp_path / "m", num_validation=0)
    assert not (tmp_path / "m").exists() and not (tmp_path / "m.tmp").exists()
