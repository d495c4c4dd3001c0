"""Issue 13: bad input is rejected early with one clear error, and nothing is lost silently.

Sections: "trainers" (configs and datasets of the drop-in trainers: every error is raised before any model loads,
proved by a model path that does not exist). Runner cases follow in their own section.
"""

import logging

import pytest
from datasets import Dataset, IterableDataset

from trl_selfplay import IRISConfig, IRISTrainer, RSPOConfig, RSPOTrainer, SPINConfig, SPINTrainer
from trl_selfplay.trainers.truncation import DataCollatorForSelfPlay

COMMON = dict(report_to="none", save_strategy="no")
PAIRS = {
    "prompt": ["Hi", "What is 2+2?", "Name a colour.", "Say yes."],
    "chosen": [" hello", " 4", " blue", " yes"],
    "rejected": [" bye", " 5", " table", " no"],
}
WIN_PROBS = {"chosen_win_prob": [0.8, 0.7, 0.9, 0.6], "rejected_win_prob": [0.2, 0.4, 0.1, 0.3]}
CONFIGS = [SPINConfig, IRISConfig, RSPOConfig]
TRAINERS = {"spin": (SPINTrainer, SPINConfig), "iris": (IRISTrainer, IRISConfig), "rspo": (RSPOTrainer, RSPOConfig)}


def _data(**changes) -> Dataset:
    data = {**PAIRS, **WIN_PROBS}
    data.update(changes)
    return Dataset.from_dict({k: v for k, v in data.items() if v is not None})


def _build(name, tmp_path, dataset, eval_dataset=None, **config):
    """Construct a trainer on a model path that does not exist: any error must come before model loading."""
    trainer_cls, config_cls = TRAINERS[name]
    args = config_cls(str(tmp_path / "out"), **COMMON, **config)
    return trainer_cls(str(tmp_path / "no-such-model"), args=args, train_dataset=dataset, eval_dataset=eval_dataset)


# =====================================================================================================================
# trainers
@pytest.mark.parametrize("config_cls", CONFIGS)
@pytest.mark.parametrize("beta", [0.0, -0.1, float("nan")])
def test_configs_reject_non_positive_beta(config_cls, beta):
    with pytest.raises(ValueError, match=r"`beta` must be a finite number > 0, got"):
        config_cls("out", beta=beta, **COMMON)


@pytest.mark.parametrize("config_cls", CONFIGS)
def test_configs_reject_negative_learning_rate(config_cls):
    with pytest.raises(ValueError, match=r"`learning_rate` must be a finite number >= 0, got -1e-05"):
        config_cls("out", learning_rate=-1e-5, **COMMON)
    assert config_cls("out", learning_rate=0.0, **COMMON).learning_rate == 0.0  # a frozen run is legitimate


@pytest.mark.parametrize("config_cls", CONFIGS)
def test_configs_reject_bad_max_prompt_length(config_cls):
    with pytest.raises(ValueError, match=r"0 < max_prompt_length < max_length \(1024\), got 1024"):
        config_cls("out", max_prompt_length=1024, **COMMON)
    with pytest.raises(ValueError, match=r"0 < max_prompt_length < max_length \(1024\), got 0"):
        config_cls("out", max_prompt_length=0, **COMMON)
    with pytest.raises(ValueError, match="`max_prompt_length` needs `max_length`"):
        config_cls("out", max_prompt_length=512, max_length=None, **COMMON)
    assert config_cls("out", max_prompt_length=512, **COMMON).max_prompt_length == 512


def test_rspo_config_rejects_unknown_forward_kl_reduction():
    with pytest.raises(ValueError, match=r"`forward_kl_reduction` must be one of \['sum', 'padded_token_mean'\]"):
        RSPOConfig("out", forward_kl_reduction="mean", **COMMON)


@pytest.mark.parametrize("name", list(TRAINERS))
@pytest.mark.parametrize("column", ["chosen", "rejected"])
def test_missing_pair_column(name, column, tmp_path):
    with pytest.raises(ValueError, match=rf"train_dataset lacks the column\(s\) \['{column}'\].*Rename or add"):
        _build(name, tmp_path, _data(**{column: None}))


@pytest.mark.parametrize("name", list(TRAINERS))
@pytest.mark.parametrize("column", ["prompt", "chosen", "rejected"])
def test_none_values_name_column_and_row(name, column, tmp_path):
    values = list(PAIRS[column])
    values[2] = values[3] = None
    with pytest.raises(ValueError, match=rf"train_dataset column `{column}` is None at row 2 \(2 rows in all\).*drop"):
        _build(name, tmp_path, _data(**{column: values}))


def test_none_in_eval_dataset_is_named(tmp_path):
    values = list(PAIRS["rejected"])
    values[1] = None
    evals = {"held_out": _data(rejected=values)}
    with pytest.raises(ValueError, match=r"eval_dataset\['held_out'\] column `rejected` is None at row 1"):
        _build("spin", tmp_path, _data(), eval_dataset=evals)


@pytest.mark.parametrize("name", list(TRAINERS))
def test_empty_dataset(name, tmp_path):
    with pytest.raises(ValueError, match=r"train_dataset is empty \(0 rows\)"):
        _build(name, tmp_path, _data().select([]))


def test_empty_iterable_dataset(tmp_path):
    empty = IterableDataset.from_generator(lambda: iter(()))
    with pytest.raises(ValueError, match=r"train_dataset is empty \(0 rows\)"):
        _build("spin", tmp_path, empty)


def test_win_probabilities_as_strings(tmp_path):
    strings = _data(chosen_win_prob=[str(p) for p in WIN_PROBS["chosen_win_prob"]])
    with pytest.raises(
        ValueError, match=r"column `chosen_win_prob` must hold numbers, but its type is string \(row 0: '0.8'\)"
    ):
        _build("rspo", tmp_path, strings)


@pytest.mark.parametrize(("values", "message"), [
    ([0.2, 0.4, 1.5, 0.3], r"`rejected_win_prob` must hold probabilities in \[0, 1\], got 1.5 at row 2"),
    ([0.2, -0.1, 0.1, 0.3], r"`rejected_win_prob` must hold probabilities in \[0, 1\], got -0.1 at row 1"),
    ([0.2, 0.4, 0.1, float("nan")], r"`rejected_win_prob` must hold probabilities in \[0, 1\], got nan at row 3"),
    ([0.2, None, 0.1, 0.3], r"`rejected_win_prob` is None at row 1"),
])  # fmt: skip
def test_win_probabilities_out_of_range_name_the_row(values, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        _build("rspo", tmp_path, _data(rejected_win_prob=values))


def test_iterable_win_probabilities_checked_on_the_first_row(tmp_path):
    rows = [dict(zip(_data().column_names, values)) for values in zip(*_data().to_dict().values())]
    rows[0]["chosen_win_prob"] = "0.8"
    stream = IterableDataset.from_generator(lambda: iter(rows))
    with pytest.raises(ValueError, match=r"column `chosen_win_prob` must hold numbers, got str '0.8' at row 0"):
        _build("rspo", tmp_path, stream)


def test_custom_collator_without_the_truncation_policy(tmp_path):
    args = SPINConfig(str(tmp_path / "out"), max_prompt_length=256, **COMMON)
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    with pytest.raises(
        ValueError, match=r"`max_prompt_length=256` is applied by the collator.*DataCollatorForSelfPlay"
    ):
        SPINTrainer(
            str(tmp_path / "no-such-model"),
            args=args,
            train_dataset=_data(),
            data_collator=DataCollatorForPreference(pad_token_id=0, max_length=1024),
        )
    # A collator that applies it is accepted (then the missing model is what fails).
    with pytest.raises(OSError):
        SPINTrainer(
            str(tmp_path / "no-such-model"),
            args=args,
            train_dataset=_data(),
            data_collator=DataCollatorForSelfPlay(pad_token_id=0, max_length=1024, max_prompt_length=256),
        )


def test_rows_dropped_for_long_prompts_are_counted_and_logged(tiny_model_path, tmp_path, caplog):
    """TRL 1.16 drops rows whose prompt alone fills `max_length` without a word; here they are logged, listed in
    `trainer.dropped_rows` (indices in the dataset as given) and counted."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    prompts = list(PAIRS["prompt"])
    prompts[1] = prompts[3] = "Tell me" + " more" * 40
    args = SPINConfig(str(tmp_path / "out"), max_length=32, per_device_train_batch_size=2, **COMMON)
    with caplog.at_level(logging.WARNING):
        trainer = SPINTrainer(
            tiny_model_path, args=args, train_dataset=_data(prompt=prompts), processing_class=tokenizer
        )
    assert trainer.dropped_rows["train"] == [1, 3] and trainer.num_dropped_rows == 2
    assert trainer.train_dataset["prompt"] == [PAIRS["prompt"][0], PAIRS["prompt"][2]]
    assert "Dropped 2 of 4 rows of the train dataset" in caplog.text and "max_prompt_length" in caplog.text


def test_rows_dropped_from_a_stream_are_recorded_as_they_pass(tiny_model_path, tmp_path, caplog):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    prompts = list(PAIRS["prompt"])
    prompts[2] = "Tell me" + " more" * 40
    rows = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in zip(prompts, PAIRS["chosen"], PAIRS["rejected"])]
    stream = IterableDataset.from_generator(lambda: iter(rows))
    args = SPINConfig(str(tmp_path / "out"), max_length=32, max_steps=1, precompute_ref_log_probs=False, **COMMON)
    trainer = SPINTrainer(tiny_model_path, args=args, train_dataset=stream, processing_class=tokenizer)
    with caplog.at_level(logging.WARNING):
        kept = [row["prompt"] for row in trainer.train_dataset]
    assert kept == [prompts[0], prompts[1], prompts[3]]
    assert trainer.dropped_rows["train"] == [2] and trainer.num_dropped_rows == 1
    assert "Dropped row 2 of the train dataset" in caplog.text
    assert len(list(trainer.train_dataset)) == 3 and trainer.dropped_rows["train"] == [2]  # a second epoch


# =====================================================================================================================
# runner
# The runner (`trl_selfplay.runner`) and its CLI: every case exits with status 2 and ONE "error:" line naming the
# field, file or row and the fix, before any model loads, and leaves every finished file as it was. Runs are
# in-process (`trl_selfplay.cli.main`) on the tiny model, except the lock and crash cases, which need a second process.
RUNNER_ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
TINY = RUNNER_ROOT / "recipes" / "tiny"
ONE_ITERATION = ("--iterations.count=1", "--iterations.overrides=null")


def _spin_args(out, model, *extra: str) -> list[str]:
    return [
        str(TINY / "spin.yaml"), f"--output_dir={out}", f"--model.name_or_path={model}", "--model.build_fn=null",
        f"--data.dataset_name={TINY / 'data.jsonl'}", "--data.num_prompts=4", *extra,
    ]  # fmt: skip


def _cli(capsys, *argv: str) -> tuple[int, list[str], str]:
    """Exit status, the "error:" lines and stdout of one in-process CLI call."""
    from trl_selfplay.cli import main

    capsys.readouterr()
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, [line for line in captured.err.splitlines() if line.startswith("error:")], captured.out


def _one_error(capsys, *argv: str) -> str:
    code, errors, _ = _cli(capsys, *argv)
    assert code == 2 and len(errors) == 1, errors
    return errors[0]


def _hashes(out) -> dict[str, str]:
    """sha256 of every file of a run directory (but the lock file, which each launch rewrites with its pid)."""
    import hashlib

    return {
        str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def _jsonl(path) -> list[dict]:
    import json

    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _weights(model_dir):
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


@pytest.fixture(scope="module")
def finished_spin(tmp_path_factory, tiny_model_path):
    """A finished 2-iteration tiny SPIN run (4 prompts); tests work on copies of it (`spin_copy`)."""
    from trl_selfplay.cli import main

    out = tmp_path_factory.mktemp("finished") / "spin"
    assert main(_spin_args(out, tiny_model_path)) == 0
    return out


@pytest.fixture
def spin_copy(finished_spin, tmp_path):
    import shutil

    out = tmp_path / "spin"
    shutil.copytree(finished_spin, out)
    return out


def _subprocess_run(out, model, pause_at: str, *extra: str):
    """`scripts/run.py` in its own process, told to pause at `pause_at` (`trl_selfplay.runner.faults`); returns the
    process once it is paused there (killed by the caller)."""
    import os
    import subprocess
    import sys
    import time

    env = {
        **os.environ, "PYTHONPATH": str(RUNNER_ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false", "TRL_SELFPLAY_PAUSE_AT": pause_at,
    }  # fmt: skip
    stage, t = pause_at.split("@")
    marker = out / f".paused-{stage}-{t}"
    log = out.parent / f"{out.name}.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(
            [sys.executable, "scripts/run.py", *_spin_args(out, model, *extra)], cwd=RUNNER_ROOT, env=env, stdout=f,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    deadline = time.monotonic() + 600
    while not marker.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            _kill(proc)
            raise AssertionError(f"the run did not pause at {pause_at}: {log.read_text()[-3000:]}")
        time.sleep(0.2)
    marker.unlink()
    return proc


def _kill(proc) -> None:
    import os
    import signal

    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)  # a crash: no cleanup runs
    proc.wait()


# -- a different recipe on an existing output_dir


@pytest.mark.parametrize(("extra", "named", "flag"), [
    (["--training.beta=0.2"], "`training.beta` of iteration 0 was 0.1 and is now 0.2", "--restart-from=train@0"),
    (["--iterations.overrides.1.training.beta=0.7"], "`training.beta` of iteration 1 was 0.5 and is now 0.7",
     "--restart-from=train@1"),
    (["--generation.temperature=0.7"], "`generation.temperature` of iteration 0 was 1.0 and is now 0.7",
     "--restart-from=generate@0"),
    (["--method=iris"], "`method` was 'spin' and is now 'iris'", "--restart-from=pairs@0"),
])  # fmt: skip
def test_a_changed_recipe_field_stops_the_run_before_any_work(spin_copy, tiny_model_path, capsys, extra, named, flag):
    before = _hashes(spin_copy)
    error = _one_error(capsys, *_spin_args(spin_copy, tiny_model_path, *extra))
    assert named in error and "--output_dir=<another directory>" in error and flag in error
    assert _hashes(spin_copy) == before  # recipe.yaml included: the stored recipe is not replaced


def test_fields_no_stage_depends_on_reuse_the_finished_run(spin_copy, tiny_model_path, capsys):
    """Logging, the Hub section and the generation batch size cannot change an output: the run is reused as it is,
    and the new recipe replaces recipe.yaml only with the previous one kept and a log line naming the fields."""
    before = _hashes(spin_copy)
    old_recipe = (spin_copy / "recipe.yaml").read_text()
    extra = ["--training.logging_steps=5", "--hub.model_id=org/other", "--generation.batch_size=2"]
    code, errors, out = _cli(capsys, *_spin_args(spin_copy, tiny_model_path, *extra))
    assert code == 0 and not errors, errors
    after = _hashes(spin_copy)
    (kept,) = [name for name in after if name.startswith("recipe_history/")]
    assert (spin_copy / kept).read_text() == old_recipe
    assert {k: v for k, v in after.items() if k != kept and k != "recipe.yaml"} == {
        k: v for k, v in before.items() if k != "recipe.yaml"
    }
    assert "differs in generation.batch_size, hub.model_id, output_dir, training.logging_steps" in out  # a copied run


def test_restart_from_moves_that_stage_and_later_outputs_and_recomputes_them(spin_copy, tiny_model_path, capsys):
    before = _hashes(spin_copy)
    old_weights = _weights(spin_copy / "iter_1" / "model")
    extra = ["--iterations.overrides.1.training.beta=0.7", "--restart-from=train@1"]
    code, errors, _ = _cli(capsys, *_spin_args(spin_copy, tiny_model_path, *extra))
    assert code == 0 and not errors, errors
    after = _hashes(spin_copy)
    kept = [name for name in before if name.startswith("iter_0/") or name.startswith("iter_1/generations")]
    assert kept and all(after[name] == before[name] for name in kept)  # upstream of train@1: untouched
    (moved,) = {name.split("/")[1] for name in after if name.startswith("discarded/")}
    assert after[f"discarded/{moved}/iter_1/model/model.safetensors"] == before["iter_1/model/model.safetensors"]
    new_weights = _weights(spin_copy / "iter_1" / "model")
    assert any(not (new_weights[k] == old_weights[k]).all() for k in new_weights)  # retrained with beta 0.7
    assert "| `beta` | 0.7 |" in (spin_copy / "iter_1" / "model" / "README.md").read_text()
    assert [m["iteration"] for m in _jsonl(spin_copy / "metrics.jsonl")] == [0, 1]


def test_restart_from_an_unknown_stage_or_iteration(spin_copy, tiny_model_path, capsys):
    before = _hashes(spin_copy)
    error = _one_error(capsys, *_spin_args(spin_copy, tiny_model_path, "--restart-from=train@2"))
    assert "--restart-from=train@2: iteration 2 is outside 0..1" in error
    error = _one_error(capsys, *_spin_args(spin_copy, tiny_model_path, "--restart-from=training@0"))
    assert "expected one of ['sft', 'initial_eval'] or <stage>@<t>" in error
    assert _hashes(spin_copy) == before


# -- damaged finished files


def _cut_lines(path, keep: int) -> None:
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:keep]))


def _flip_last_digit(path) -> None:
    text = path.read_text()
    i = max(i for i, c in enumerate(text) if c.isdigit())
    path.write_text(text[:i] + str((int(text[i]) + 1) % 10) + text[i + 1 :])


@pytest.mark.parametrize(("damage", "name", "found", "flag"), [
    (lambda p: _cut_lines(p, 2), "iter_1/generations.jsonl", "has 2 rows", "--restart-from=generate@1"),
    (lambda p: p.write_bytes(b""), "iter_0/train.jsonl", "has 0 rows, 0 bytes", "--restart-from=pairs@0"),
    (_flip_last_digit, "iter_0/reference.json", "but a different sha256", "--restart-from=train@0"),
])  # fmt: skip
def test_a_damaged_finished_file_is_named(spin_copy, tiny_model_path, capsys, damage, name, found, flag):
    damage(spin_copy / name)
    before = _hashes(spin_copy)
    error = _one_error(capsys, *_spin_args(spin_copy, tiny_model_path))
    assert f"{spin_copy / name} has " in error and found in error and "the file is damaged" in error and flag in error
    if name.endswith(".jsonl"):
        assert "but it had 4 rows" in error
    assert _hashes(spin_copy) == before


def test_a_damaged_file_is_regenerated_when_asked(spin_copy, tiny_model_path, capsys):
    """A generations file cut at a line boundary, regenerated with --restart-from: the same samples as before (the
    sampling is seeded), and everything upstream untouched."""
    before = _hashes(spin_copy)
    path = spin_copy / "iter_1" / "generations.jsonl"
    complete = path.read_text()
    _cut_lines(path, 2)
    code, errors, _ = _cli(capsys, *_spin_args(spin_copy, tiny_model_path, "--restart-from=generate@1"))
    assert code == 0 and not errors, errors
    assert path.read_text() == complete
    after = _hashes(spin_copy)
    assert all(after[name] == h for name, h in before.items() if name.startswith("iter_0/"))


def test_metrics_jsonl_is_rebuilt_from_the_iteration_files(spin_copy, tiny_model_path, capsys):
    """A crash between iteration 1's metrics.json and metrics.jsonl: the next run restores the missing line."""
    complete = _jsonl(spin_copy / "metrics.jsonl")
    _cut_lines(spin_copy / "metrics.jsonl", 1)
    before = _hashes(spin_copy)
    code, errors, _ = _cli(capsys, *_spin_args(spin_copy, tiny_model_path))
    assert code == 0 and not errors, errors
    assert _jsonl(spin_copy / "metrics.jsonl") == complete and [m["iteration"] for m in complete] == [0, 1]
    after = _hashes(spin_copy)
    changed = {k for k in after if after[k] != before.get(k) and not k.startswith("recipe_history/")}
    assert changed <= {"metrics.jsonl", "metrics.png", "recipe.yaml"}  # recipe.yaml: the copy's output_dir


# -- crashes and concurrent launches (a second process)


def test_a_crash_between_the_model_and_its_metrics_is_trained_again(tmp_path, tiny_model_path, capsys):
    """Killed after `model/` is saved and before `train_metrics.json` and the stage's manifest: the stage is not done,
    so the rerun trains it again (it used to fail forever with FileNotFoundError) and ends with the same weights."""
    out = tmp_path / "spin"
    proc = _subprocess_run(out, tiny_model_path, "model_saved@0", *ONE_ITERATION)
    _kill(proc)
    it0 = out / "iter_0"
    assert (it0 / "model" / "model.safetensors").exists() and not (it0 / "train_metrics.json").exists()
    assert not (it0 / "manifest" / "train.json").exists()
    saved = _weights(it0 / "model")
    generations = _hashes(out)["iter_0/generations.jsonl"]
    code, errors, _ = _cli(capsys, *_spin_args(out, tiny_model_path, *ONE_ITERATION))
    assert code == 0 and not errors, errors
    assert (it0 / "train_metrics.json").exists() and (it0 / "manifest" / "train.json").exists()
    assert _hashes(out)["iter_0/generations.jsonl"] == generations  # a finished stage is reused
    retrained = _weights(it0 / "model")
    for key in saved:
        assert (retrained[key] == saved[key]).all()


def test_a_second_run_on_the_same_directory_fails_at_once(tmp_path, tiny_model_path, capsys):
    out = tmp_path / "spin"
    proc = _subprocess_run(out, tiny_model_path, "generate@0")  # holds the lock, paused mid-write
    try:
        before = _hashes(out)
        error = _one_error(capsys, *_spin_args(out, tiny_model_path))
        assert f"{out} is in use by another run (pid {proc.pid} on " in error
        assert "--output_dir=<another directory>" in error
        assert _hashes(out) == before
    finally:
        _kill(proc)
    # The kernel released the dead run's lock: the next launch runs (and resumes).
    code, errors, _ = _cli(capsys, *_spin_args(out, tiny_model_path, *ONE_ITERATION))
    assert code == 0 and not errors, errors


# -- RSPO: identical samples


def test_rspo_with_greedy_decoding_is_rejected(capsys):
    """Through `MethodSpec.distinct_samples` (RSPO's pairs are two samples of one prompt), not a method name: SPIN
    with temperature 0 is a valid recipe."""
    rspo = [str(TINY / "rspo.yaml"), f"--data.dataset_name={TINY / 'data.jsonl'}", "--generation.temperature=0"]
    error = _one_error(capsys, "--dry-run", *rspo)
    assert "`generation.temperature` is 0 (greedy decoding)" in error and "rspo" in error
    assert "Set `generation.temperature` > 0" in error
    spin = [str(TINY / "spin.yaml"), f"--data.dataset_name={TINY / 'data.jsonl'}", "--generation.temperature=0"]
    assert _cli(capsys, "--dry-run", *spin)[0] == 0


def test_prompts_whose_samples_tie_are_skipped_and_counted(tmp_path, capsys):
    """The pairs stage drops the prompts whose chosen and rejected samples are the same text, and logs the count."""
    from trl_selfplay.recipes import load_recipe
    from trl_selfplay.runner import stages
    from trl_selfplay.runner.context import Iteration, RunContext

    recipe = load_recipe(
        TINY / "rspo.yaml",
        [f"--output_dir={tmp_path}", f"--data.dataset_name={TINY / 'data.jsonl'}", "--data.num_prompts=4",
         "--data.num_folds=1"],
    )  # fmt: skip
    it = Iteration(RunContext(recipe), 0)
    it.dir.mkdir(parents=True)
    samples = [["a", "b", "c"], ["same", "same", "same"], ["x", "y", "x"], ["s", "s", "s"]]
    it.generations = [
        {"prompt": f"p{i}", "response": None, "completions": c, "num_tokens": [1] * 3} for i, c in enumerate(samples)
    ]
    it.preferences = [
        {"chosen_index": 0, "rejected_index": 1, "win_probs": [0.6, 0.4, 0.5]},
        {"chosen_index": 0, "rejected_index": 2, "win_probs": [0.5, 0.5, 0.5]},
        {"chosen_index": 1, "rejected_index": 2, "win_probs": [0.4, 0.7, 0.4]},
        {"chosen_index": 2, "rejected_index": 1, "win_probs": [0.5, 0.5, 0.5]},
    ]
    stages.pairs(it)
    train = _jsonl(it.dir / "train.jsonl")
    assert [(r["prompt"][-1]["content"], r["chosen"][0]["content"]) for r in train] == [("p0", "a"), ("p2", "y")]
    assert it.num_tied_pairs == 2 and it.num_current_rows == 2
    assert "2 of 4 prompts have identical chosen and rejected samples" in capsys.readouterr().out


# -- over-long prompts: counted, and the reference values keyed by row


def test_pairs_dropped_by_the_trainer_are_reported_and_the_reference_is_keyed_by_row(
    tmp_path, tiny_model_path, capsys
):
    import json

    from test_loop import _chosen_rejected_logps

    data = tmp_path / "data.jsonl"
    rows = [json.loads(line) for line in (TINY / "data.jsonl").read_text().splitlines()[:6]]
    for i in (1, 4):
        rows[i]["prompt"] = "Tell me" + " more" * 40  # the prompt alone is longer than max_length
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "spin"
    extra = [
        f"--data.dataset_name={data}",
        "--data.num_prompts=null",
        *ONE_ITERATION,
        "--training.max_length=64",
    ]
    code, errors, log = _cli(capsys, *_spin_args(out, tiny_model_path), *extra)
    assert code == 0 and not errors, errors
    train = _jsonl(out / "iter_0" / "train.jsonl")
    long = [i for i, r in enumerate(train) if "more more" in r["prompt"][-1]["content"]]
    assert len(train) == 6 and len(long) == 2
    ref = json.loads((out / "iter_0" / "reference.json").read_text())
    kept = [i for i in range(6) if i not in long]
    assert ref["dropped_rows"] == long and ref["rows"] == kept and ref["current_rows"] == [0, 4]
    assert (
        f"the trainer dropped 2 of 6 pairs whose prompt alone fills `training.max_length` (train.jsonl rows {long})"
        in log
    )
    assert json.loads((out / "iter_0" / "metrics.json").read_text())["num_dropped_pairs"] == 2
    # Entry i is train.jsonl row rows[i]: the start model (this iteration's reference) gives the same log-probs.
    chosen, rejected = _chosen_rejected_logps(tiny_model_path, [train[i] for i in kept])
    assert chosen == pytest.approx(ref["ref_chosen_logps"], abs=2e-3)
    assert rejected == pytest.approx(ref["ref_rejected_logps"], abs=2e-3)


# -- checked before any model loads, and by --dry-run


@pytest.mark.parametrize("dry_run", [True, False])
@pytest.mark.parametrize(("extra", "field"), [
    (["--model.name_or_path=/no/such/model"], "`model.name_or_path` is '/no/such/model', a local path"),
    (["--model.anchor_name_or_path=./no-such-anchor"], "`model.anchor_name_or_path` is './no-such-anchor', a local path"),
    (["--judge.model_name_or_path=runs/no/pairrm"], "`judge.model_name_or_path` is 'runs/no/pairrm', a local path"),
])  # fmt: skip
def test_a_missing_local_model_path(tmp_path, tiny_model_path, capsys, extra, field, dry_run):
    args = [
        str(TINY / "rspo.yaml"), f"--output_dir={tmp_path / 'out'}", f"--model.name_or_path={tiny_model_path}",
        "--model.build_fn=null", f"--data.dataset_name={TINY / 'data.jsonl'}", f"--judge.model_name_or_path={tmp_path}",
        *extra,
    ]  # fmt: skip
    error = _one_error(capsys, *(["--dry-run"] if dry_run else []), *args)
    assert field in error and "does not exist" in error and "a Hub id is 'name' or 'org/name'" in error
    assert not (tmp_path / "out").exists()


def test_a_hub_id_missing_from_the_offline_cache(tmp_path, capsys):
    """`org/name` is a Hub id: --dry-run does not look it up; an offline run checks the local Hub cache first."""
    args = _spin_args(tmp_path / "out", "no-such-org/no-such-model")
    assert _cli(capsys, "--dry-run", *args)[0] == 0
    error = _one_error(capsys, *args)
    assert "`model.name_or_path` is 'no-such-org/no-such-model', a Hub id" in error
    assert "not in the local Hub cache" in error and "hf download" in error
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("dry_run", [True, False])
def test_more_folds_than_prompts(tmp_path, capsys, dry_run):
    args = [str(TINY / "rspo.yaml"), f"--output_dir={tmp_path / 'out'}", f"--data.dataset_name={TINY / 'data.jsonl'}",
            "--data.num_prompts=null", "--data.num_folds=20", "--judge.type=function",
            "--judge.function=test_stages:length_reward"]  # fmt: skip
    error = _one_error(capsys, *(["--dry-run"] if dry_run else []), *args)
    assert "Iteration 0 has no prompt: 16 prompt(s)" in error and "`data.num_folds` = 20" in error
    assert "Lower `data.num_folds` to at most 16" in error
    assert not (tmp_path / "out").exists()


def test_hub_push_offline_cannot_check_the_token(tmp_path, tiny_model_path, capsys):
    args = _spin_args(tmp_path / "out", tiny_model_path, "--hub.push=true", "--hub.model_id=org/tiny")
    for dry_run in ([], ["--dry-run"]):
        error = _one_error(capsys, *dry_run, *args)
        assert "`hub.push` is true, but HF_HUB_OFFLINE is set: the Hub token cannot be checked" in error
        assert "--hub.push=false" in error
    assert not (tmp_path / "out").exists()


def test_hub_push_without_a_usable_token(tmp_path, tiny_model_path, capsys, monkeypatch):
    """Online: no token at all, then a token the Hub refuses (`whoami` fails), both before the first iteration."""
    import huggingface_hub

    class Unauthorized(Exception):
        pass

    class RefusingApi:
        def whoami(self):
            raise Unauthorized("401 Client Error: Unauthorized")

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    args = _spin_args(tmp_path / "out", tiny_model_path, "--hub.push=true", "--hub.model_id=org/tiny")
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    error = _one_error(capsys, "--dry-run", *args)
    assert "`hub.push` is true, but no Hub token is set" in error and "hf auth login" in error
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_invalid")
    monkeypatch.setattr(huggingface_hub, "HfApi", RefusingApi)
    error = _one_error(capsys, *args)
    assert "the Hub token is not usable (Unauthorized: 401 Client Error: Unauthorized)" in error
    assert not (tmp_path / "out").exists()


def test_an_output_dir_that_cannot_be_created(tmp_path, tiny_model_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for dry_run in ([], ["--dry-run"]):
        error = _one_error(capsys, *dry_run, *_spin_args(blocker / "run", tiny_model_path))
        assert f"`output_dir` {blocker / 'run'} cannot be created: {blocker} is a file" in error


@pytest.mark.skipif(__import__("os").geteuid() == 0, reason="root writes through permissions")
def test_an_unwritable_output_dir(tmp_path, tiny_model_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    error = _one_error(capsys, "--dry-run", *_spin_args(locked / "run", tiny_model_path))
    assert f"cannot be created: {locked} is not writable" in error


@pytest.mark.parametrize(("extra", "message"), [
    (["--training.beta=0"], "`training.beta` must be a finite number > 0, got 0.0"),
    (["--training.beta=-0.1"], "`training.beta` must be a finite number > 0, got -0.1"),
    (["--training.learning_rate=-1e-5"], "`training.learning_rate` must be a finite number >= 0, got -1e-05"),
    (["--iterations.overrides.1.training.beta=0"], "`training.beta` must be a finite number > 0, got 0.0"),
])  # fmt: skip
@pytest.mark.parametrize("method", ["spin", "iris"])
def test_non_positive_beta_and_negative_learning_rate_name_the_recipe_field(tmp_path, capsys, method, extra, message):
    args = [
        str(TINY / f"{method}.yaml"),
        f"--output_dir={tmp_path / 'out'}",
        f"--data.dataset_name={TINY / 'data.jsonl'}",
    ]
    error = _one_error(capsys, "--dry-run", *args, *extra)
    assert message in error and f"({method.upper()}Config" in error
    assert ("iteration 1)" in error) == ("overrides" in extra[0])


# -- unreadable data: a sentence naming the file and row, not a traceback


@pytest.mark.parametrize(("content", "message"), [
    (b"", "{path} is empty (0 bytes)"),
    (b'{"prompt": "a", "response": "b"}\n{"prompt": "c", "response": "d"}\n{"prompt": "e\xff", "response": "f"}\n',
     "{path} line 3 is not UTF-8 (byte 0xff at column 14)"),
    (b'{"prompt": "a", "response": "b"}\n{"prompt": "c", "response": "d"}\n{"prompt": "e", "response": "f"\n',
     "{path} line 3 is not a JSON object"),
    (b'{"prompt": "a", "response": "b"}\n{"prompt": "c", "response": "d"}\n{"prompt": null, "response": "f"}\n',
     "`data.prompt_column`: a prompt is None (missing). This is row 2 (line 3) of {path}"),
    (b'{"prompt": "a", "response": "b"}\n{"prompt": "c", "response": null}\n{"prompt": "e", "response": "f"}\n',
     "`data.response_column`: an annotated response is None (missing). This is row 1 (line 2) of {path}"),
])  # fmt: skip
@pytest.mark.parametrize("dry_run", [True, False])
def test_unreadable_dataset_rows_are_named(tmp_path, tiny_model_path, capsys, content, message, dry_run):
    path = tmp_path / "data.jsonl"
    path.write_bytes(content)
    args = _spin_args(tmp_path / "out", tiny_model_path, f"--data.dataset_name={path}", "--data.num_prompts=null")
    error = _one_error(capsys, *(["--dry-run"] if dry_run else []), *args)
    assert message.format(path=path) in error
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("method", "schedule", "depends"), [
    ("spin", None, False), ("iris", "adaptive", False), ("iris", "constant", False), ("iris", "linear", True),
])  # fmt: skip
def test_extending_a_run_keeps_its_finished_training_unless_the_count_matters(method, schedule, depends):
    """More iterations leave iteration 0's training valid, except where α_t is spread over the count (IRIS's linear
    schedule, through `MethodSpec.uses_iteration_count`)."""
    from trl_selfplay.recipes import load_recipe
    from trl_selfplay.runner.fingerprint import StageInputs, changed_fields

    extra = [] if schedule is None else [f"--training.alpha_schedule={schedule}"]
    two, four = (
        StageInputs(load_recipe(TINY / f"{method}.yaml", [*extra, f"--iterations.count={n}"])).of("train", 0)
        for n in (2, 4)
    )
    assert changed_fields(two, four) == (["`iterations.count` was 2 and is now 4"] if depends else [])
