"""Recipe format: the shipped recipes carry the papers' values (recipes/README.md), overrides work, bad recipes fail
early.

The dry-runs here run in-process through `trl_selfplay.cli.main` (one TRL import for all recipes); one test goes
through `scripts/run.py` as a subprocess to check the script itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from trl_selfplay.cli import main
from trl_selfplay.recipes import RecipeError, load_recipe, parse_overrides

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted(
    str(p.relative_to(ROOT)) for d in ("spin", "iris", "rspo", "tiny") for p in (ROOT / "recipes" / d).glob("*.yaml")
)
SPIN_TEMPLATE = "### Instruction: {prompt}\n\n### Response: "


def _dry_run(capsys, *args: str) -> list[dict]:
    cwd = os.getcwd()
    os.chdir(ROOT)  # recipes name local data relative to the repository root
    try:
        code = main(["--dry-run", *args])
    finally:
        os.chdir(cwd)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return [json.loads(line) for line in captured.out.splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def shipped_records():
    """Dry-run records of every shipped recipe, by recipe path (one in-process call for all of them)."""
    capture = pytest.MonkeyPatch()
    import io
    from contextlib import redirect_stdout

    buffer = io.StringIO()
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        with redirect_stdout(buffer):
            assert main(["--dry-run", *SHIPPED]) == 0
    finally:
        os.chdir(cwd)
        capture.undo()
    records: dict[str, list[dict]] = {}
    for line in buffer.getvalue().splitlines():
        record = json.loads(line)
        records.setdefault(record["recipe"], []).append(record)
    return records


def test_every_shipped_recipe_is_valid(shipped_records):
    assert set(shipped_records) == set(SHIPPED)
    for path, records in shipped_records.items():
        count = yaml.safe_load(open(ROOT / path))["iterations"]["count"]
        assert [r["iteration"] for r in records] == list(range(count)), path
        # Iteration t starts from iteration t-1's checkpoint.
        for t in range(1, count):
            assert records[t]["model"].endswith(f"iter_{t - 1}/model"), path
        for r in records:
            if r["method"] != "sft":
                assert r["training"]["precompute_ref_log_probs"] is True, path


def test_spin_recipe_matches_paper(shipped_records):
    records = shipped_records["recipes/spin/zephyr-7b-sft-full.yaml"]
    assert len(records) == 4
    assert records[0]["model"] == "alignment-handbook/zephyr-7b-sft-full"
    assert [r["training"]["learning_rate"] for r in records] == [5e-7, 5e-7, 1e-7, 1e-7]
    assert [r["training"]["beta"] for r in records] == [0.1, 0.1, 0.1, 5.0]
    for r in records:
        t, g, d = r["training"], r["generation"], r["data"]
        assert t["global_batch_size"] == 64 and t["num_processes"] == 1
        assert t["per_device_train_batch_size"] * t["gradient_accumulation_steps"] == 64
        assert t["optim"] == "rmsprop" and t["weight_decay"] == 0.0
        assert t["warmup_steps"] == 0.1  # the paper's warmup ratio, transformers 5's fractional warmup_steps
        assert t["lr_scheduler_type"] == "linear" and t["bf16"] is True
        assert t["max_length"] == 2048 and t["num_train_epochs"] == 2  # the paper's (the scripts': 1024, 6)
        assert t["loss_type"] == ["sigmoid"]
        assert g["max_new_tokens"] == 256 and g["temperature"] == 0 and g["prompt_template"] == SPIN_TEMPLATE
        assert d["dataset_name"] == "UCLA-AGI/SPIN_iter0" and d["num_prompts"] is None
        assert d["mix_previous_iterations"] == 1


@pytest.mark.parametrize("path", ["recipes/iris/zephyr-7b-sft-full.yaml", "recipes/iris/qwen2.5-3b.yaml"])
def test_iris_recipes_match_paper(shipped_records, path):
    records = shipped_records[path]
    assert len(records) == 5
    for r in records:
        t = r["training"]
        assert t["global_batch_size"] == 64 and t["num_train_epochs"] == 2 and t["optim"] == "rmsprop"
        assert t["alpha_schedule"] == "adaptive" and t["alpha_start"] == 2.0 and t["alpha_end"] == 0.5
        assert t["beta"] == 0.1 and t["loss_type"] == ["renyi"]
        assert r["data"]["num_prompts"] is None
    assert "our assumption" in (ROOT / path).read_text().lower()


RSPO_REGULARIZERS = {
    "recipes/rspo/mistral-7b-instruct-v0.2.yaml": {"reverse_kl": 0.5, "forward_kl_is": 0.1},
    "recipes/rspo/mistral-7b-instruct-v0.2-reverse-kl.yaml": {"reverse_kl": 0.5},
    "recipes/rspo/mistral-7b-instruct-v0.2-chi2.yaml": {"chi2": 0.1},
    "recipes/rspo/mistral-7b-instruct-v0.2-forward-kl-is.yaml": {"forward_kl_is": 0.1},
    "recipes/rspo/mistral-7b-instruct-v0.2-forward-kl.yaml": {"forward_kl": 1.0},
    "recipes/rspo/mistral-7b-instruct-v0.2-sppo.yaml": {},
}


@pytest.mark.parametrize("path", sorted(RSPO_REGULARIZERS))
def test_rspo_recipes_match_paper(shipped_records, path):
    records = shipped_records[path]
    assert len(records) == 3
    for t, r in enumerate(records):
        tr, g = r["training"], r["generation"]
        assert r["data"]["fold"] == 0 and r["data"]["num_folds"] == 1  # one prompt dataset per iteration
        assert g["num_samples"] == 5 and g["temperature"] == 0.7 and g["top_p"] == 0.9 and g["max_new_tokens"] == 2048
        assert r["judge"] == {**r["judge"], "type": "pairrm", "model_name_or_path": "llm-blender/PairRM"}
        assert tr["beta"] == 0.001 and tr["learning_rate"] == 5e-7 and tr["optim"] == "rmsprop"
        assert tr["global_batch_size"] == 64 and tr["num_train_epochs"] == 1
        assert tr["regularizers"] == RSPO_REGULARIZERS[path]
        assert r["anchor"] == "mistralai/Mistral-7B-Instruct-v0.2"  # μ is the start model at every iteration
        if "forward_kl" in tr["regularizers"]:  # μ's own samples: π_0 = μ at iteration 0, then μ samples again
            assert r["anchor_samples"] == ("policy sample 0 (pi_t = mu)" if t == 0 else "1 per prompt generated by mu")
        else:
            assert "anchor_samples" not in r
    assert records[0]["model"] == "mistralai/Mistral-7B-Instruct-v0.2"


def test_global_batch_size_adapts_to_processes(capsys):
    records = _dry_run(capsys, "--num-processes", "8", "recipes/spin/zephyr-7b-sft-full.yaml")
    assert records[0]["training"]["gradient_accumulation_steps"] == 1
    assert records[0]["training"]["global_batch_size"] == 64 and records[0]["training"]["num_processes"] == 8


def test_cli_overrides(capsys):
    records = _dry_run(
        capsys,
        "recipes/spin/zephyr-7b-sft-full.yaml",
        "--training.learning_rate=1e-6",
        "--iterations.overrides.3.training.beta=2.5",
        "--data.num_prompts",
        "10",
        "--generation.prompt_template=null",
    )
    # The override of a field also set per iteration loses to the iteration's own value (iterations 2, 3).
    assert [r["training"]["learning_rate"] for r in records] == [1e-6, 1e-6, 1e-7, 1e-7]
    assert records[3]["training"]["beta"] == 2.5
    assert all(r["data"]["num_prompts"] == 10 and r["generation"]["prompt_template"] is None for r in records)


def test_parse_overrides_types():
    parsed = parse_overrides(["--a.b=5e-7", "--a.c", "true", "--iterations.overrides.2.training.beta=1"])
    assert parsed == {"a": {"b": "5e-7", "c": True}, "iterations": {"overrides": {2: {"training": {"beta": 1}}}}}


def test_yaml_exponent_without_dot_is_a_float(tmp_path):
    # YAML 1.1 reads `5e-7` as a string; the recipe must still get the number.
    recipe = _write(tmp_path, _base(training={"learning_rate": "5e-7"}))
    assert load_recipe(recipe).training == {"learning_rate": "5e-7"}  # kept as written in the recipe ...
    from trl_selfplay.recipes import build_training_config

    config = build_training_config("spin", {"learning_rate": "5e-7"}, str(tmp_path / "o"))
    assert config.learning_rate == 5e-7  # ... and typed when the config is built


def test_subprocess_script_dry_run():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "scripts/run.py", "--dry-run", "recipes/rspo/mistral-7b-instruct-v0.2.yaml"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [line["iteration"] for line in lines] == [0, 1, 2]
    assert lines[2]["model"] == "runs/rspo-mistral-7b/iter_1/model"


# ----------------------------------------------------------------------------------------------- bad recipes


def _base(**sections) -> dict:
    recipe = {
        "method": "spin",
        "output_dir": "unused",
        # A path that does not exist: any attempt to load the model would fail with a different error.
        "model": {"name_or_path": "/nonexistent/model"},
        "data": {"dataset_name": str(ROOT / "recipes/tiny/data.jsonl"), "response_column": "response"},
        "training": {"learning_rate": 1e-6},
    }
    recipe.update(sections)
    return recipe


def _write(tmp_path: Path, recipe: dict) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _run_error(tmp_path, capsys, recipe: dict, dry_run: bool = False) -> str:
    path = _write(tmp_path, recipe)
    code = main([*(["--dry-run"] if dry_run else []), str(path)])
    err = capsys.readouterr().err
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err  # ONE clear error
    return lines[0]


def test_missing_method(tmp_path, capsys):
    recipe = _base()
    del recipe["method"]
    assert "`method` is required" in _run_error(tmp_path, capsys, recipe)


@pytest.mark.parametrize(
    ("section", "bad", "suggestion"),
    [
        (None, "trainig", "training"),
        ("generation", "temprature", "temperature"),
        ("training", "learning_rat", "learning_rate"),
        ("data", "prompt_colum", "prompt_column"),
    ],
)
def test_unknown_key_suggests_nearest(tmp_path, capsys, section, bad, suggestion):
    recipe = _base()
    if section is None:
        recipe[bad] = {}
    else:
        recipe.setdefault(section, {})[bad] = 1
    error = _run_error(tmp_path, capsys, recipe)
    assert f"Unknown key `{(section + '.') if section else ''}{bad}`" in error
    assert f"Did you mean `{suggestion}`?" in error


@pytest.mark.parametrize(
    ("update", "message"),
    [
        ({"generation": {"max_new_tokens": "many"}}, "`generation.max_new_tokens` must be an integer"),
        ({"training": {"learning_rate": "fast"}}, "`training.learning_rate` must be a number"),
        ({"training": {"optim": "rmsprp"}}, "rmsprp is not a valid OptimizerNames"),
        ({"hub": {"push": "yes"}}, "`hub.push` must be true or false"),
        (
            {"iterations": {"count": 2, "overrides": {1: {"model": {"dtype": "float32"}}}}},
            "cannot change per iteration",
        ),
        ({"iterations": {"count": 2, "overrides": {5: {"training": {"beta": 1.0}}}}}, "outside 0..1"),
        ({"hub": {"push": True}}, "`hub.model_id` is required"),
        ({"training": {"warmup_ratio": 0.1, "warmup_steps": 10}}, "only one of `training.warmup_ratio`"),
    ],
)
def test_wrong_types_and_values(tmp_path, capsys, update, message):
    assert message in _run_error(tmp_path, capsys, _base(**update))


def test_rspo_needs_two_samples(tmp_path, capsys):
    recipe = _base(method="rspo", generation={"num_samples": 1}, judge={"type": "pairrm"})
    error = _run_error(tmp_path, capsys, recipe)
    assert "`generation.num_samples` (K) must be >= 2 for rspo" in error


def test_dataset_without_needed_column(tmp_path, capsys):
    recipe = _base(data={"dataset_name": str(ROOT / "recipes/tiny/data.jsonl"), "response_column": "answer"})
    # Caught by --dry-run (a local dataset is opened) and by a real run, before the (nonexistent) model is loaded.
    for dry_run in (True, False):
        error = _run_error(tmp_path, capsys, recipe, dry_run=dry_run)
        assert "`data.response_column` is 'answer', but the dataset has no such column" in error
        assert "'prompt', 'response'" in error


def test_evaluation_kwargs_checked_against_hook(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "tests" / "scripts"))
    recipe = _base(evaluation={"function": "loop_eval:evaluate", "prob": "x"})
    error = _run_error(tmp_path, capsys, recipe)
    assert "Unknown key `evaluation.prob`" in error and "Did you mean `probe`?" in error


def test_recipe_error_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="`method` must be one of"):
        load_recipe(_write(tmp_path, _base(method="dpo")))
    with pytest.raises(RecipeError, match="Did you mean `spin`"):
        load_recipe(_write(tmp_path, _base(method="spn")))


# ------------------------------------------------------------------------------------- loop data preparation


def test_folds_and_prompt_selection_are_deterministic_and_disjoint(tmp_path):
    from trl_selfplay.runner import check_data, iteration_examples

    recipe = load_recipe(
        ROOT / "recipes/tiny/rspo.yaml",
        ["--data.num_prompts=12", "--data.num_folds=3", f"--data.dataset_name={ROOT / 'recipes/tiny/data.jsonl'}"],
    )
    dataset = check_data(recipe)
    folds = [[e["prompt"] for e in iteration_examples(dataset, recipe, t)] for t in range(4)]
    assert [len(f) for f in folds] == [4, 4, 4, 4]
    assert len(set(folds[0]) | set(folds[1]) | set(folds[2])) == 12  # disjoint folds of the 12 selected prompts
    assert folds[3] == folds[0]  # iteration 3 wraps around to fold 0
    assert folds == [[e["prompt"] for e in iteration_examples(check_data(recipe), recipe, t)] for t in range(4)]


def test_training_prompt_is_the_generation_prompt(tiny_model_path):
    """The text training conditions on is exactly what generation conditioned on, for a fixed
    template (plain-text pairs) and for the chat template (conversational pairs rendered by TRL)."""
    from transformers import AutoTokenizer
    from trl.data_utils import maybe_apply_chat_template

    from trl_selfplay.generation import format_prompt
    from trl_selfplay.runner.data import TrainingFormat

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    row = TrainingFormat(SPIN_TEMPLATE).pair("Name a colour.", "blue", "dog")
    assert row["prompt"] == format_prompt(tokenizer, "Name a colour.", SPIN_TEMPLATE)
    row = TrainingFormat(None).pair("Name a colour.", "blue", "dog")
    rendered = maybe_apply_chat_template(row, tokenizer)
    assert rendered["prompt"] == format_prompt(tokenizer, "Name a colour.", None)
    assert rendered["chosen"].startswith("blue") and rendered["rejected"].startswith("dog")


def test_fewer_prompts_than_folds_is_an_error(tmp_path):
    with pytest.raises(RecipeError, match="a fold would be empty"):
        load_recipe(ROOT / "recipes/tiny/rspo.yaml", ["--data.num_prompts=2", "--data.num_folds=3"])


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the CPU-only message")
def test_mixed_precision_without_gpu_fails_before_loading(tmp_path, capsys):
    # Valid for --dry-run (the recipe targets GPUs), but a real run on this CPU-only machine stops at once.
    # A Hub id: --dry-run does not look for it (a missing local path would fail the dry run too).
    recipe = _base(training={"bf16": True}, model={"name_or_path": "some-org/some-model"})
    _dry_run(capsys, str(_write(tmp_path, recipe)))
    error = _run_error(tmp_path, capsys, recipe)
    assert "`training.bf16: true` needs a GPU" in error and "--training.bf16=false" in error


def test_every_recipe_is_checked_before_the_first_runs(tmp_path, capsys):
    good = _write(tmp_path, _base())
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    bad = _write(bad_dir, _base(data={"dataset_name": str(ROOT / "recipes/tiny/data.jsonl"), "response_column": "x"}))
    # The first recipe's model does not exist: had it started, the error would be a model-loading one.
    assert main([str(good), str(bad)]) == 2
    assert "`data.response_column` is 'x'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------------------
# Paper recipes run what the originals ran (docs/fidelity.md): each `--dry-run` record shows the judge mode, the
# truncation policy, the templates, the decoding, the revision and the datasets, and the documented alternatives
# ("ours") are valid overrides.

SPIN_RECIPE = ROOT / "recipes/spin/zephyr-7b-sft-full.yaml"
IRIS_RECIPES = [ROOT / "recipes/iris/zephyr-7b-sft-full.yaml", ROOT / "recipes/iris/qwen2.5-3b.yaml"]
RSPO_RECIPES = sorted((ROOT / "recipes/rspo").glob("*.yaml"))
PAPER_RECIPES = [SPIN_RECIPE, *IRIS_RECIPES, *RSPO_RECIPES]
ZEPHYR_REVISION = "ac6e600eefcce74f5e8bae1035d4f66019e93190"  # uclaml/SPIN configs/config.yaml
MISTRAL_REVISION = "1296dc8fd9b21e6424c9c305c06db9ae60c03ace"  # xiaohangt/RSPO scripts/generate.py
SPPO_PROMPTS = [f"UCLA-AGI/data-mistral-7b-instruct-sppo-iter{i}" for i in (1, 2, 3)]


def _paper_dry_run(path: Path, overrides: list[str] | None = None) -> list[dict]:
    from trl_selfplay.recipes import dry_run

    return dry_run(load_recipe(path, overrides or []))


def _documented_alternative(path: Path) -> list[str]:
    """The override lines a recipe documents under its "Alternative (ours)" comment."""
    lines = path.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if "Alternative (ours)" in line)
    overrides = []
    for line in lines[start + 1 :]:
        text = line.strip()
        if not text.startswith("#   --"):
            break
        overrides += text.lstrip("#").split()
    return overrides


def test_spin_recipe_runs_the_original_pipeline_by_default():
    records = _paper_dry_run(SPIN_RECIPE)
    assert records[0]["revision"] == ZEPHYR_REVISION  # the Hub model changed after the paper
    for r in records:
        d, g, t = r["data"], r["generation"], r["training"]
        # UCLA-AGI/SPIN_iter0: the prompt is the first user turn of `real`, the annotated answer its assistant turn.
        assert (d["dataset_name"], d["split"], d["prompt_column"], d["response_column"]) == (
            "UCLA-AGI/SPIN_iter0", "train", "real", "real",
        )  # fmt: skip
        assert d["num_prompts"] is None and d["mix_previous_iterations"] == 1
        # spin/generate.py: fixed template without BOS, greedy, 256 tokens; spin/run_spin.py trains on the chat
        # template with an empty system message.
        assert g["prompt_template"] == SPIN_TEMPLATE and g["add_special_tokens"] is False
        assert g["temperature"] == 0 and g["max_new_tokens"] == 256 and g["num_samples"] == 1
        assert d["train_prompt_format"] == "chat_template" and d["system_message"] == ""
        # The paper's 2 epochs and 2048 tokens; the original collator's truncation with max_prompt_length 512.
        assert t["num_train_epochs"] == 2 and t["max_length"] == 2048 and t["max_prompt_length"] == 512
        assert "512" in r["truncation"] and "2048" in r["truncation"]
        assert t["warmup_steps"] == 0.1 and t["optim"] == "rmsprop" and t["global_batch_size"] == 64
    assert [r["training"]["beta"] for r in records] == [0.1, 0.1, 0.1, 5.0]
    assert [r["training"]["learning_rate"] for r in records] == [5e-7, 5e-7, 1e-7, 1e-7]
    header = SPIN_RECIPE.read_text().split("\nmethod:")[0]
    for original in ("configs/config.yaml", "scripts/finetune", "spin/generate.py", "spin/run_spin.py"):
        assert original in header
    # Where the scripts and the paper differ, the header says exactly how.
    assert "--num_train_epochs=6" in header and "max_length 1024" in header and "2048" in header


@pytest.mark.parametrize("path", RSPO_RECIPES, ids=lambda p: p.name)
def test_rspo_recipes_run_the_original_pipeline_by_default(path):
    records = _paper_dry_run(path)
    assert [r["data"]["dataset_name"] for r in records] == SPPO_PROMPTS  # one prompt set per iteration
    assert records[0]["revision"] == MISTRAL_REVISION
    for r in records:
        d, g, t, j = r["data"], r["generation"], r["training"], r["judge"]
        assert d["num_folds"] == 1 and d["fold"] == 0 and d["num_prompts"] is None and d["prompt_column"] == "prompt"
        # scripts/rank.py + scripts/compute_prob.py: PairRM scores on the chat-templated prompt, pair by score.
        assert (j["type"], j["mode"], j["prompt_format"]) == ("pairrm", "aggregate", "chat_template")
        # scripts/generate.py: the chat template, K = 5 at T 0.7 / top-p 0.9 / 2048 tokens; one BOS.
        assert g["prompt_template"] is None and g["add_special_tokens"] is None
        assert d["train_prompt_format"] == "generation"
        assert (g["num_samples"], g["temperature"], g["top_p"], g["max_new_tokens"]) == (5, 0.7, 0.9, 2048)
        # recipes/uclaml-sppo/config_full.yaml: max_length 1024, max_prompt_length 512 (old collator), warmup 0.1.
        assert t["max_length"] == 1024 and t["max_prompt_length"] == 512 and "512" in r["truncation"]
        assert t["warmup_steps"] == 0.1 and t["num_train_epochs"] == 1 and t["global_batch_size"] == 64
        # sppo/trainer_reg.py `sppo_forward` normalises by the padded batch; every other setting is unaffected.
        expected = "padded_token_mean" if "forward_kl" in t["regularizers"] else "sum"
        assert t["forward_kl_reduction"] == expected
    header = path.read_text().split("\nmethod:")[0]
    for original in ("scripts/generate.py", "scripts/rank.py", "scripts/compute_prob.py", "sppo/trainer_reg.py"):
        assert original in header


@pytest.mark.parametrize("path", IRIS_RECIPES, ids=lambda p: p.name)
def test_iris_recipes_label_what_the_abstract_does_not_state(path):
    header = path.read_text().split("\nmethod:")[0]
    assert "OUR ASSUMPTION" in header
    assumptions = header.split("OUR ASSUMPTION", 1)[1]
    for item in ("iterations", "beta 0.1", "learning rate 5e-7", "benchmark list", "UCLA-AGI/SPIN_iter0"):
        assert item in assumptions, item
    records = _paper_dry_run(path)
    assert len(records) == 5
    for r in records:  # the assumed pipeline is SPIN's original one
        assert r["data"]["dataset_name"] == "UCLA-AGI/SPIN_iter0"
        assert r["generation"]["prompt_template"] == SPIN_TEMPLATE and r["generation"]["temperature"] == 0
        assert r["data"]["train_prompt_format"] == "chat_template" and r["training"]["max_prompt_length"] == 512
    if "zephyr" in path.name:
        assert "44.57" in assumptions and records[0]["revision"] == ZEPHYR_REVISION


@pytest.mark.parametrize("path", [SPIN_RECIPE, *IRIS_RECIPES, RSPO_RECIPES[0]], ids=lambda p: p.name)
def test_documented_data_alternative_is_a_valid_override(path):
    overrides = _documented_alternative(path)
    assert overrides, f"{path.name} documents no alternative data source"
    records = _paper_dry_run(path, overrides)
    names = {r["data"]["dataset_name"] for r in records}
    assert names <= {"HuggingFaceH4/ultrachat_200k", "HuggingFaceH4/ultrafeedback_binarized"} and len(names) == 1
    if records[0]["method"] == "rspo":  # our sampling: all prompts in 3 folds, one per iteration
        assert [r["data"]["fold"] for r in records] == [0, 1, 2]


@pytest.mark.parametrize(
    "path, overrides, check",
    [
        (SPIN_RECIPE, ["--data.train_prompt_format=generation"], lambda r: r["data"]["train_prompt_format"]),
        (SPIN_RECIPE, ["--generation.temperature=1.0"], lambda r: r["generation"]["temperature"]),
        (RSPO_RECIPES[0], ["--judge.mode=pairwise"], lambda r: r["judge"]["mode"]),
        (RSPO_RECIPES[0], ["--judge.prompt_format=raw"], lambda r: r["judge"]["prompt_format"]),
        (RSPO_RECIPES[0], ["--training.max_prompt_length=null"], lambda r: r["training"]["max_prompt_length"]),
    ],
)
def test_our_options_named_in_the_recipes_readme_are_valid_overrides(path, overrides, check):
    default, changed = _paper_dry_run(path)[0], _paper_dry_run(path, overrides)[0]
    assert check(changed) != check(default)
    assert overrides[0] in (ROOT / "recipes/README.md").read_text()


def test_docs_and_recipe_readme_link_only_inside_the_repository():
    import re

    pages = [ROOT / "recipes/README.md", *sorted((ROOT / "docs").glob("*.md"))]
    assert {p.name for p in pages} >= {"README.md", "methods.md", "pipeline.md", "fidelity.md"}
    for page in [*pages, *PAPER_RECIPES]:
        text = page.read_text()
        assert "DESIGN.md" not in text, page
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
            assert not target.startswith(("http:", "https:", "/")), (page, target)
            assert (page.parent / target).resolve().exists(), (page, target)
