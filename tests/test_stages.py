"""The runner's stages in-process (no `accelerate launch`): each stage's output, the one finished-output rule, and
a method added through the registry alone (`trl_selfplay.methods.register`) running through the real runner."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from trl_selfplay.methods import MethodSpec, PairInputs, get_method, method_names, register, unregister
from trl_selfplay.recipes import RecipeError, load_recipe
from trl_selfplay.runner import SelfPlayRunner, iteration_examples, stages
from trl_selfplay.runner.context import Iteration, RunContext
from trl_selfplay.runner.data import TrainingFormat

ROOT = Path(__file__).resolve().parents[1]


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _iteration(recipe_path: str, tmp_path: Path, model: str, t: int = 0, extra: list[str] | None = None) -> Iteration:
    recipe = load_recipe(
        ROOT / recipe_path,
        [f"--output_dir={tmp_path}", f"--model.name_or_path={model}", "--data.num_prompts=4", *(extra or [])],
    )
    ctx = RunContext(recipe)
    ctx.load_datasets()
    it = Iteration(ctx, t)
    it.dir.mkdir(parents=True, exist_ok=True)
    it.examples = iteration_examples(ctx.dataset(it.recipe), it.recipe, t)
    return it


def test_generate_then_pairs_in_process(tmp_path, tiny_model_path):
    """generate → pairs for SPIN: one sample per prompt, seeded by generation.seed + t, rows in TRL's
    conversational format with the annotated response as chosen."""
    it = _iteration("recipes/tiny/spin.yaml", tmp_path, tiny_model_path)
    stages.generate(it)
    rows = _rows(it.dir / "generations.jsonl")
    assert [r["prompt"] for r in rows] == [e["prompt"] for e in it.examples]
    assert all(len(r["completions"]) == 1 and r["response"] for r in rows)
    stages.pairs(it)
    train = _rows(it.dir / "train.jsonl")
    assert it.num_current_rows == len(train) == 4
    assert train[0] == TrainingFormat().pair(rows[0]["prompt"], rows[0]["response"], rows[0]["completions"][0])


def test_finished_output_is_reused_not_recomputed(tmp_path, tiny_model_path):
    """The one rule for finished outputs: a stage whose manifest was written after its file is read back and its
    work skipped (the generation model is never loaded: it is deleted before the second call); the same file without
    its manifest is an unfinished stage's and is computed again."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model_path, model)
    out = tmp_path / "out"
    it = _iteration("recipes/tiny/spin.yaml", out, str(model))
    stages.generate(it)
    path = it.dir / "generations.jsonl"
    before = (path.read_bytes(), path.stat().st_mtime_ns)
    manifest = json.loads((it.dir / "manifest" / "generate.json").read_text())
    assert manifest["files"]["iter_0/generations.jsonl"]["rows"] == 4
    shutil.rmtree(model)
    again = _iteration("recipes/tiny/spin.yaml", out, str(model))
    stages.generate(again)
    assert (path.read_bytes(), path.stat().st_mtime_ns) == before
    assert again.generations == _rows(path)
    (it.dir / "manifest" / "generate.json").unlink()
    with pytest.raises(OSError):  # recomputing loads the (deleted) model
        stages.generate(_iteration("recipes/tiny/spin.yaml", out, str(model)))


def test_judge_stage_with_a_function_judge(tmp_path, tiny_model_path):
    """judge: a reward-function judge's preferences per prompt, with the chosen / rejected picks the pairs use."""
    it = _iteration(
        "recipes/tiny/rspo.yaml", tmp_path, tiny_model_path,
        extra=["--judge.type=function", "--judge.function=test_stages:length_reward", "--data.num_folds=1"],
    )  # fmt: skip
    stages.generate(it)
    stages.judge(it)
    prefs = _rows(it.dir / "preferences.jsonl")
    assert len(prefs) == len(it.generations) == 4
    for gen, pref in zip(it.generations, prefs, strict=True):
        lengths = [len(c) for c in gen["completions"]]
        assert len(pref["preferences"]) == 3 and all(len(row) == 3 for row in pref["preferences"])
        assert lengths[pref["chosen_index"]] == max(lengths) and lengths[pref["rejected_index"]] == min(lengths)
    stages.pairs(it)
    train = _rows(it.dir / "train.jsonl")
    assert [row["chosen_win_prob"] for row in train] == [p["win_probs"][p["chosen_index"]] for p in prefs]


def length_reward(prompt: str, completion: str) -> float:
    """A judge for the test above: longer is better."""
    return float(len(completion))


def test_each_iteration_reads_its_own_dataset(tmp_path):
    """`iterations.overrides.<t>.data.dataset_name` gives iteration t its own prompts (as the SPPO/RSPO recipes read
    one prompt set per iteration); all datasets are loaded and checked before any model."""
    second = tmp_path / "iter1.jsonl"
    second.write_text("".join(json.dumps({"prompt": f"second set {i}"}) + "\n" for i in range(3)))
    recipe = load_recipe(
        ROOT / "recipes/tiny/rspo.yaml",
        [f"--output_dir={tmp_path}", "--data.num_folds=1", f"--iterations.overrides.1.data.dataset_name={second}"],
    )
    ctx = RunContext(recipe)
    ctx.load_datasets()
    assert len(ctx.datasets) == 2
    first = [e["prompt"] for e in iteration_examples(ctx.dataset(recipe.for_iteration(0)), recipe.for_iteration(0), 0)]
    later = [e["prompt"] for e in iteration_examples(ctx.dataset(recipe.for_iteration(1)), recipe.for_iteration(1), 1)]
    assert len(first) == 8 and not any(p.startswith("second set") for p in first)
    assert sorted(later) == [f"second set {i}" for i in range(3)]


def test_pairs_mix_previous_iterations(tmp_path):
    """SPIN at t = 1 trains on iteration 0's pairs again, before its own (the builder's contract: current rows last)."""
    fmt = TrainingFormat()
    gen = lambda p: {"prompt": p, "response": "r-" + p, "completions": ["g-" + p]}  # noqa: E731
    inputs = PairInputs(examples=[], fmt=fmt, generations=[gen("b")], previous=[[gen("a")]])
    rows, current = get_method("spin").build_rows(inputs)
    assert current == 1 and [r["chosen"][0]["content"] for r in rows] == ["r-a", "r-b"]


# ------------------------------------------------------------------------------------------- the method registry


def _reversed_rows(inputs: PairInputs):
    """A toy method: the annotated response against its own reversal (no generation needed to build a pair)."""
    rows = [inputs.fmt.pair(e["prompt"], e["response"], e["response"][::-1]) for e in inputs.examples]
    return rows, len(rows)


@pytest.fixture
def toy_method():
    spec = register(
        MethodSpec(
            name="toy",
            config="trl_selfplay.trainers.spin:SPINConfig",
            trainer="trl_selfplay.trainers.spin:SPINTrainer",
            paper="Toy",
            citation="a test method",
            build_rows=_reversed_rows,
            generates=False,
        )
    )
    yield spec
    unregister("toy")


def test_a_new_method_needs_only_a_registry_entry(tmp_path, tiny_model_path, toy_method):
    """A method registered at run time is accepted by the recipe parser, the dry run and the runner, which
    trains it end to end (rows built by its own builder, a model and a model card naming it)."""
    from trl_selfplay.recipes import dry_run, validate

    assert "toy" in method_names()
    raw = yaml.safe_load((ROOT / "recipes/tiny/spin.yaml").read_text())
    raw.update(method="toy", output_dir=str(tmp_path), iterations={"count": 1})
    raw["model"]["name_or_path"] = tiny_model_path
    raw["data"].update(num_prompts=4, dataset_name=str(ROOT / "recipes/tiny/data.jsonl"))
    del raw["data"]["mix_previous_iterations"]
    recipe = validate(raw)
    (record,) = dry_run(recipe)
    assert record["method"] == "toy" and record["generation"] is None
    SelfPlayRunner(recipe).run()
    train = _rows(tmp_path / "iter_0" / "train.jsonl")
    assert [row["rejected"][0]["content"] for row in train] == [row["chosen"][0]["content"][::-1] for row in train]
    assert not (tmp_path / "iter_0" / "generations.jsonl").exists()
    assert (tmp_path / "iter_0" / "model" / "model.safetensors").exists()
    assert "# Toy iteration 0" in (tmp_path / "iter_0" / "model" / "README.md").read_text()
    metrics = _rows(tmp_path / "metrics.jsonl")
    assert metrics[-1]["method"] == "toy" and metrics[-1]["num_pairs"] == 4


def test_unknown_method_names_the_registered_ones():
    with pytest.raises(RecipeError, match="`method` must be one of"):
        get_method("dpo-iterative")
