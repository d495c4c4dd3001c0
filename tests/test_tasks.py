"""The bundled addition task: deterministic data, exact-match metric, programmatic judge, character tokenizer."""

import math

import pytest

from trl_selfplay.tasks import TASKS, get_task
from trl_selfplay.tasks.arithmetic import (
    ArithmeticTask,
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


def test_default_is_every_two_digit_sum_but_the_held_out_ones():
    task = ArithmeticTask()
    train = {p["prompt"] for p in task.train_pairs()}
    assert len(train) == 10_000 - 200 and len(task.eval_prompts()) == 200
    assert not train & set(task.eval_prompts())
    assert task.max_new_tokens == 5


def test_dataset_fn_and_registry():
    train = addition_dataset("train", num_digits=2, num_train=30, num_eval=5)
    assert train.column_names == ["prompt", "completion"] and len(train) == 30
    assert addition_dataset("eval", num_digits=2, num_train=30, num_eval=5).column_names == ["prompt", "answer"]
    with pytest.raises(ValueError, match="split"):
        addition_dataset("validation")
    assert isinstance(get_task("arithmetic", num_train=1, num_eval=1), TASKS["arithmetic"])
    with pytest.raises(ValueError, match="bundled tasks"):
        get_task("sudoku")


def test_bad_sizes_raise_before_drawing():
    with pytest.raises(ValueError, match="num_digits"):
        ArithmeticTask(num_digits=0)
    with pytest.raises(ValueError, match="distinct"):
        ArithmeticTask(num_digits=1, num_train=100, num_eval=1)


def test_character_level_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    from trl_selfplay.tasks.arithmetic import make_arithmetic_model

    path = make_arithmetic_model(tmp_path / "m", hidden_size=32, num_hidden_layers=1, num_attention_heads=1)
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer("123+456=579")["input_ids"]
    assert [tokenizer.decode([i]) for i in ids] == list("123+456=579")
    assert tokenizer.eos_token == "<|im_end|>"
