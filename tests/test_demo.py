"""`make demo`: the demo recipes validate, and a shortened demo runs end to end through the real runner with a quiet
terminal whose table matches the stored metrics."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEMO_RECIPES = sorted((REPO / "recipes" / "demo").glob("*.yaml"))
METHODS = ("sft", "spin", "iris", "rspo")


def test_demo_recipes_pass_dry_run(capsys, monkeypatch):
    import yaml

    from trl_selfplay.cli import main

    monkeypatch.chdir(REPO)
    assert [p.stem.split("_", 1)[1] for p in DEMO_RECIPES] == list(METHODS)
    assert main(["--dry-run", *map(str, DEMO_RECIPES)]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [(r["method"], r["iteration"]) for r in records] == [(m, t) for m in METHODS for t in range(3)]
    # Every method starts from the same warm start and trains the same steps per iteration on the same prompts.
    assert {r["model"] for r in records if r["iteration"] == 0} == {"runs/demo/warm-start"}
    assert {(r["data"]["num_prompts"], r["training"]["per_device_train_batch_size"]) for r in records} == {(3200, 64)}
    assert {r["data"]["seed"] for r in records} == {0}
    for path in DEMO_RECIPES:
        raw = yaml.safe_load(path.read_text())
        # Any demo recipe can run alone: it builds the shared warm start when it is missing.
        assert raw["model"]["build_fn"] == "trl_selfplay.tasks.arithmetic:make_arithmetic_warm_start"
        # Our configuration triggers no deprecation or CPU warning: the new name, and no pinned memory on CPU.
        assert "gradient_checkpointing" not in raw["training"] and raw["training"]["activation_checkpointing"] is False
        assert raw["training"]["dataloader_pin_memory"] is False
    iris = [r for r in records if r["method"] == "iris"][0]["training"]
    assert iris["alpha_schedule"] == "adaptive"


def _table_rows(out: str) -> dict[tuple[str, str], dict[str, str]]:
    """The summary table printed by the demo: {(run, iteration): {column: cell}}."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("run ") and "iteration" in line)
    header = re.split(r"\s{2,}", lines[start].strip())
    rows = {}
    for line in lines[start + 2 :]:
        if not line.strip():
            break
        cells = re.split(r"\s{2,}", line.strip())
        rows[(cells[0], cells[1])] = dict(zip(header, cells))
    return rows


def test_quick_demo_is_quiet_and_its_table_matches_the_metrics(tmp_path):
    root = tmp_path / "demo"
    env = {k: v for k, v in os.environ.items() if k not in ("TQDM_DISABLE", "PYTHONWARNINGS")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "demo.py"), "--quick", "--output-root", str(root)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    terminal = proc.stdout + proc.stderr
    assert proc.returncode == 0, terminal[-3000:]

    # About a screen: stage lines, the table, the plots; no library progress bar, warning or runner chatter.
    assert len(terminal.splitlines()) <= 40, terminal
    for noise in ("it/s", "examples/s", "%|", "Warning", "warn(", "[trl-selfplay]", "{'loss'"):
        assert noise not in terminal, (noise, terminal)
    log_dir = Path(re.search(r"logs: (\S+)/ ", proc.stdout).group(1))
    logs = {path.name: path.read_text() for path in log_dir.glob("*.log")}
    assert {"warm-start.log", "00_sft.log", "10_spin.log", "20_iris.log", "30_rspo.log"} <= set(logs)
    # The runner's lines went to the stage's log file, not nowhere ...
    assert all("[trl-selfplay]" in logs[f"{recipe.stem}.log"] for recipe in DEMO_RECIPES)
    # ... and our own configuration caused no warning there either.
    for text in logs.values():
        assert "`gradient_checkpointing` is deprecated" not in text and "pin_memory" not in text

    # The table on the terminal is the stored metrics of each run.
    rows = _table_rows(proc.stdout)
    labels = {"sft": "continued SFT", "spin": "SPIN + NLL", "iris": "IRIS + NLL", "rspo": "RSPO"}
    for method in METHODS:
        lines = [json.loads(line) for line in open(root / method / "metrics.jsonl")]
        assert [line["iteration"] for line in lines] == [-1, 0]
        for line in lines:
            label = "warm start" if line["iteration"] == -1 else labels[method]
            row = rows[(label, "start" if line["iteration"] == -1 else str(line["iteration"]))]
            assert row["accuracy"] == f"{line['eval']['accuracy']:.3f}"
            assert row["length"] == f"{line['eval']['length']:.3f}"
            if line["iteration"] >= 0:
                assert row["win_rate"] == f"{line['eval']['win_rate']:.3f}"
        assert lines[1]["eval"]["num_eval_prompts"] == 16 and "win_rate" in lines[1]["eval"]
        assert (root / method / "metrics.png").exists() and str(root / method / "metrics.png") in proc.stdout
    # Every run starts from the one warm start, built once, with its stopping record.
    starts = {json.loads(open(root / m / "metrics.jsonl").readline())["eval"]["accuracy"] for m in METHODS}
    assert len(starts) == 1
    assert json.loads((root / "warm-start" / "warm_start.json").read_text())["steps"] >= 1
    # IRIS's adaptive order is logged for its iteration.
    iris = [json.loads(line) for line in open(root / "iris" / "metrics.jsonl")][1]["train"]
    assert 0.5 <= iris["iris/alpha"] <= 2.0 and "iris/gap" in iris
    assert (root / "comparison.png").exists() and str(root / "comparison.png") in proc.stdout
