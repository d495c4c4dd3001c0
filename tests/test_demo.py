"""`make demo`: the demo recipes validate, and a shortened demo runs end to end through the real runner."""

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DEMO_RECIPES = sorted((REPO / "recipes" / "demo").glob("*.yaml"))


def _demo_module():
    spec = importlib.util.spec_from_file_location("demo_script", REPO / "scripts" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_recipes_pass_dry_run(capsys, monkeypatch):
    from trl_selfplay.cli import main

    monkeypatch.chdir(REPO)
    assert [p.stem.split("_", 1)[1] for p in DEMO_RECIPES] == ["sft", "spin", "iris", "rspo"]
    assert main(["--dry-run", *map(str, DEMO_RECIPES)]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    methods = [(r["method"], r["iteration"]) for r in records]
    assert methods == [(m, t) for m in ("sft", "spin", "iris", "rspo") for t in range(3)]
    # Every method starts from the warm start the first recipe trains, and trains the same steps per iteration.
    start = {r["method"]: r["model"] for r in records if r["iteration"] == 0}
    assert set(start.values()) == {"runs/demo/sft/sft/model"}
    steps = {(r["data"]["num_prompts"], r["training"]["per_device_train_batch_size"]) for r in records}
    assert steps == {(3200, 64)}
    assert "sft" in records[0]  # the warm-start stage runs once, in the first recipe
    iris = [r for r in records if r["method"] == "iris"][0]["training"]
    assert iris["alpha_schedule"] == "adaptive"


@pytest.mark.slow
def test_shortened_demo_end_to_end(tmp_path, capsys):
    demo = _demo_module()
    root = tmp_path / "demo"
    assert demo.main(["--quick", "--output-root", str(root)]) == 0
    out = capsys.readouterr().out

    for method in ("sft", "spin", "iris", "rspo"):
        lines = [json.loads(line) for line in open(root / method / "metrics.jsonl")]
        assert [line["iteration"] for line in lines] == [-1, 0]
        start, after = (line["eval"] for line in lines)
        assert 0.0 <= after["accuracy"] <= 1.0 and after["num_eval_prompts"] == 16
        assert "win_rate" in after and "win_rate" not in start
        assert after["length"] > 0
        # All recipes start from the same warm start: same greedy answers, same accuracy.
        assert start["accuracy"] == json.loads(open(root / "sft" / "metrics.jsonl").readline())["eval"]["accuracy"]
        assert (root / method / "metrics.png").exists()
    # The warm start was trained once, by the first recipe.
    assert (root / "sft" / "sft" / "model").is_dir() and not (root / "spin" / "sft").exists()
    iris = [json.loads(line) for line in open(root / "iris" / "metrics.jsonl")][1]["train"]
    # Adaptive schedule at the first iteration: alpha_start when the warm start has a gap to close (D̂_0 > 0),
    # alpha_end when it has none (possible after the few warm-start steps of --quick).
    assert iris["iris/alpha"] == pytest.approx(2.0 if iris["iris/gap"] > 0 else 0.5)

    import matplotlib.image

    image = matplotlib.image.imread(root / "comparison.png")
    assert image.ndim == 3 and image.shape[2] == 4 and image.shape[0] >= 300 and image.shape[1] >= 800
    assert "Per-iteration evaluation" in out and str(root / "comparison.png") in out
    for method in ("sft", "spin", "iris", "rspo"):
        assert any(row.split()[:2] == [method, "0"] for row in out.splitlines())
