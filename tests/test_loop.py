"""End-to-end runs of the self-play loop on CPU: `accelerate launch scripts/run.py recipes/tiny/<method>.yaml` as a
subprocess, 2 iterations each, on a tiny random model built locally (and a tiny random PairRM for RSPO).

Resume: the RSPO run is killed (SIGKILL to the process group) during generation, during judging and during
training of iteration 1, rerun each time, and must end with the same checkpoint as an uninterrupted run without
rewriting finished files. The kill lands at a known point through the loop's test hook `TRL_SELFPLAY_PAUSE_AT`:
generation and judging are stopped half-way through writing their output file (after sampling / judging, so the
stage's work is lost), training after its first optimizer step (or step k with "train@t:k").
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = str(Path(sys.executable).parent / "accelerate")
TIMEOUT = 600


def _env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env.update(
        PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests" / "scripts")]),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TQDM_DISABLE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
    )
    env.pop("TRL_SELFPLAY_PAUSE_AT", None)
    env.update(extra or {})
    return env


def _command(recipe: str, out: Path, overrides: list[str], num_processes: int) -> list[str]:
    return [
        # Several processes on CPU go through the multi-process (torchrun) launcher; `--cpu` would start only one.
        ACCELERATE, "launch", *(["--multi_gpu"] if num_processes > 1 else ["--cpu"]),
        "--num_processes", str(num_processes), "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(29500 + os.getpid() % 1000),
        "scripts/run.py", recipe, f"--output_dir={out}", *overrides,
    ]  # fmt: skip


def launch(recipe: str, out: Path, overrides: list[str], num_processes: int = 1) -> float:
    """Run a recipe to completion; returns the wall time."""
    start = time.perf_counter()
    proc = subprocess.run(
        _command(recipe, out, overrides, num_processes),
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return time.perf_counter() - start


def launch_and_kill(recipe: str, out: Path, overrides: list[str], pause_at: str) -> None:
    """Start a run that pauses at `pause_at` ("<stage>@<t>"), then kill its whole process group there."""
    stage, t = pause_at.split(":")[0].split("@")
    marker = out / f".paused-{stage}-{t}"
    marker.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out.parent / f"{out.name}-{stage}-{t}.log"
    # The output goes to a file: an unread pipe fills up and blocks the child.
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            _command(recipe, out, overrides, 1),
            cwd=ROOT,
            env=_env({"TRL_SELFPLAY_PAUSE_AT": pause_at}),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + TIMEOUT
            while not marker.exists():
                if proc.poll() is not None:
                    raise AssertionError(f"run ended before pausing at {pause_at}: {log_path.read_text()[-4000:]}")
                if time.monotonic() > deadline:
                    raise AssertionError(f"run did not reach {pause_at}: {log_path.read_text()[-4000:]}")
                time.sleep(0.2)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)  # a crash: no cleanup handler runs
            proc.wait()
    marker.unlink()


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _fingerprint(path: Path) -> tuple[str, int]:
    return hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns


def _weights(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


def _chosen_rejected_logps(model_path: str | Path, rows: list[dict]) -> tuple[list[float], list[float]]:
    """Sum of completion-token log-probs of chosen/rejected under a model, tokenised as TRL does for
    conversational pairs (chat template of prompt + completion; completion = tokens after the rendered prompt)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()

    def ids(messages, **kwargs):
        out = tokenizer.apply_chat_template(messages, tokenize=True, **kwargs)
        return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)

    def logp(prompt, completion):
        prompt_ids = ids(prompt, add_generation_prompt=True)
        full = ids(prompt + completion)
        assert full[: len(prompt_ids)] == prompt_ids
        with torch.no_grad():
            logits = model(torch.tensor([full])).logits[0, :-1].float()
        token_logps = torch.log_softmax(logits, -1).gather(-1, torch.tensor(full[1:])[:, None])[:, 0]
        return token_logps[len(prompt_ids) - 1 :].sum().item()

    return [logp(r["prompt"], r["chosen"]) for r in rows], [logp(r["prompt"], r["rejected"]) for r in rows]


# --------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny_pairrm(tmp_path_factory):
    from trl_selfplay.testing import make_tiny_pairrm

    return str(make_tiny_pairrm(tmp_path_factory.mktemp("tiny-pairrm")))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_path, tiny_pairrm):
    """Lazily run each tiny recipe once (2 iterations) and share the output between tests."""
    cache: dict[str, tuple[Path, float]] = {}
    base = tmp_path_factory.mktemp("loop-runs")

    def get(method: str) -> tuple[Path, float]:
        if method not in cache:
            out = base / method
            cache[method] = (out, launch(f"recipes/tiny/{method}.yaml", out, overrides(method)))
        return cache[method]

    def overrides(method: str) -> list[str]:
        args = [f"--model.name_or_path={tiny_model_path}"]
        if method == "rspo":
            args.append(f"--judge.model_name_or_path={tiny_pairrm}")
        if method == "sft":
            args += ["--evaluation.function=loop_eval:evaluate", "--evaluation.probe=The capital of France is Paris."]
        return args

    get.overrides = overrides
    get.wall_times = {}
    yield get
    print("\nwall time of the 2-iteration CPU runs:", {m: f"{t:.1f}s" for m, (_, t) in cache.items()})


def _check_iteration_outputs(out: Path, method: str) -> list[dict]:
    for t in (0, 1):
        it = out / f"iter_{t}"
        assert (it / "model" / "model.safetensors").exists() and (it / "model" / "tokenizer.json").exists()
        card = (it / "model" / "README.md").read_text()
        assert f"iteration {t}" in card and f"- {method}" in card
        assert not list(it.glob("**/*.tmp"))
        if method != "sft":
            assert len(_rows(it / "generations.jsonl")) > 0 and len(_rows(it / "train.jsonl")) > 0
    metrics = _rows(out / "metrics.jsonl")
    trained = [m for m in metrics if m["iteration"] >= 0]
    assert [m["iteration"] for m in trained] == [0, 1]
    assert trained[1]["start_model"] == str(out / "iter_0" / "model")  # iteration 1 starts from iteration 0
    assert all("train_loss" in m["train"] for m in trained)
    return metrics


# ------------------------------------------------------------------------------------------------------ tests


@pytest.mark.slow
def test_spin_two_iterations(runs, tiny_model_path):
    out, _ = runs("spin")
    _check_iteration_outputs(out, "spin")
    gen0, gen1 = _rows(out / "iter_0" / "generations.jsonl"), _rows(out / "iter_1" / "generations.jsonl")
    assert len(gen0) == len(gen1) == 8 and [g["prompt"] for g in gen0] == [g["prompt"] for g in gen1]
    # SPIN's data mixing: iteration 1 trains on iteration 0's pairs plus its own.
    train1 = _rows(out / "iter_1" / "train.jsonl")
    assert len(train1) == 16
    assert [r["rejected"][0]["content"] for r in train1] == [g["completions"][0] for g in gen0 + gen1]
    assert all(r["chosen"][0]["content"] == g["response"] for r, g in zip(train1, gen0 + gen1))
    # The reference of iteration 1 is iteration 0's model: its log-probs match, the initial model's do not.
    ref = json.loads((out / "iter_1" / "reference.json").read_text())
    chosen, rejected = _chosen_rejected_logps(out / "iter_0" / "model", train1)
    assert chosen == pytest.approx(ref["ref_chosen_logps"], abs=2e-3)
    assert rejected == pytest.approx(ref["ref_rejected_logps"], abs=2e-3)
    initial_chosen, _ = _chosen_rejected_logps(tiny_model_path, train1)
    assert max(abs(a - b) for a, b in zip(initial_chosen, ref["ref_chosen_logps"])) > 0.1
    # The per-iteration override (iteration 1: beta 0.5) reached the trainer.
    assert "| `beta` | 0.5 |" in (out / "iter_1" / "model" / "README.md").read_text()


@pytest.mark.slow
def test_finished_run_is_not_rewritten(runs, tiny_model_path):
    out, _ = runs("spin")
    files = [p for p in out.rglob("*") if p.is_file() and p.name != ".lock"]  # each launch writes its pid there
    before = {p: _fingerprint(p) for p in files}
    launch("recipes/tiny/spin.yaml", out, runs.overrides("spin"))
    assert {p: _fingerprint(p) for p in files} == before


@pytest.mark.slow
def test_iris_two_iterations_adaptive_alpha(runs):
    from trl_selfplay.losses import iris_alpha

    out, _ = runs("iris")
    metrics = _check_iteration_outputs(out, "iris")
    refs = [json.loads((out / f"iter_{t}" / "reference.json").read_text()) for t in (0, 1)]
    # D̂_t is computed from π_t's own reference pass (per-token log-likelihoods of generated vs annotated).
    for ref in refs:
        per_token = [lp / n for lp, n in zip(ref["ref_rejected_logps"], ref["rejected_lengths"])]
        per_token_real = [lp / n for lp, n in zip(ref["ref_chosen_logps"], ref["chosen_lengths"])]
        assert ref["gap"] == pytest.approx(sum(per_token) / len(per_token) - sum(per_token_real) / len(per_token_real))
    assert refs[1]["initial_gap"] == pytest.approx(refs[0]["gap"])
    # The magnitude rule: α_0 = alpha_start whatever the sign of D̂_0 (a random model's is ~0 with either sign).
    assert refs[0]["alpha"] == 2.0
    assert all(
        ref["current_rows"] == [0, 8] and ref["method_metrics"] == ["alpha", "gap", "initial_gap"] for ref in refs
    )
    expected = iris_alpha(
        "adaptive", 1, 2, alpha_start=2.0, alpha_end=0.5, gap=refs[1]["gap"], initial_gap=refs[0]["gap"]
    )
    assert refs[1]["alpha"] == pytest.approx(expected)
    # α_t reached the trainer (its own logged metric) and the metrics file.
    for t in (0, 1):
        history = json.loads((out / f"iter_{t}" / "train_metrics.json").read_text())["log_history"]
        logged = [h["iris/alpha"] for h in history if "iris/alpha" in h]
        assert logged and all(a == pytest.approx(refs[t]["alpha"]) for a in logged)
        assert metrics[t]["train"]["iris/alpha"] == pytest.approx(refs[t]["alpha"])
    # No mixing in this recipe: 8 pairs per iteration, and iteration 1's reference is iteration 0's model.
    train1 = _rows(out / "iter_1" / "train.jsonl")
    assert len(train1) == 8
    chosen, _ = _chosen_rejected_logps(out / "iter_0" / "model", train1)
    assert chosen == pytest.approx(refs[1]["ref_chosen_logps"], abs=2e-3)


@pytest.mark.slow
def test_rspo_two_iterations(runs, tiny_model_path):
    out, _ = runs("rspo")
    _check_iteration_outputs(out, "rspo")
    gens = [_rows(out / f"iter_{t}" / "generations.jsonl") for t in (0, 1)]
    # Two folds of the 8 prompts: disjoint prompt sets, K = 3 samples each.
    assert len(gens[0]) == len(gens[1]) == 4
    assert not {g["prompt"] for g in gens[0]} & {g["prompt"] for g in gens[1]}
    assert all(len(g["completions"]) == 3 for g in gens[0] + gens[1])
    for t in (0, 1):
        prefs = _rows(out / f"iter_{t}" / "preferences.jsonl")
        train = _rows(out / f"iter_{t}" / "train.jsonl")
        for g, p, row in zip(gens[t], prefs, train):
            matrix = p["preferences"]
            assert all(matrix[i][i] == 0.5 for i in range(3))
            assert p["win_probs"] == pytest.approx([sum(r) / 3 for r in matrix])  # mean including the diagonal
            assert p["win_probs"][p["chosen_index"]] == max(p["win_probs"])
            assert p["win_probs"][p["rejected_index"]] == min(p["win_probs"])
            assert row["chosen"][0]["content"] == g["completions"][p["chosen_index"]]
            assert row["rejected"][0]["content"] == g["completions"][p["rejected_index"]]
            assert row["chosen_win_prob"] == max(p["win_probs"]) and row["rejected_win_prob"] == min(p["win_probs"])
    ref = json.loads((out / "iter_1" / "reference.json").read_text())
    assert ref["reference_model"] == str(out / "iter_0" / "model")
    _check_anchor_samples(out, gens, tiny_model_path)


def _check_anchor_samples(out: Path, gens: list[list[dict]], mu_path: str) -> None:
    """The recipe's `forward_kl` regularizer: one sample of μ (the iteration-0 start model) per prompt. At iteration
    0 π_0 = μ, so sample 0 of the K is μ's; at iteration 1 μ samples again (its own seed), and training starts at
    a forward-KL estimate of 0 (iteration 0, policy = μ) and away from 0 (iteration 1, policy π_1 ≠ μ)."""
    from trl_selfplay.generation import generate_completions

    assert not (out / "iter_0" / "anchor_generations.jsonl").exists()
    for row, g in zip(_rows(out / "iter_0" / "train.jsonl"), gens[0]):
        assert row["anchor_completion"] == [{"role": "assistant", "content": g["completions"][0]}]
    anchor_rows = _rows(out / "iter_1" / "anchor_generations.jsonl")
    assert [a["prompt"] for a in anchor_rows] == [g["prompt"] for g in gens[1]]
    g = yaml.safe_load((ROOT / "recipes" / "tiny" / "rspo.yaml").read_text())["generation"]
    mu_samples = generate_completions(
        mu_path, [a["prompt"] for a in anchor_rows], num_samples=1, temperature=g["temperature"],
        max_new_tokens=g["max_new_tokens"], seed=g.get("seed", 0) + 1_000_003 + 1, batch_size=g["batch_size"],
    ).completions  # fmt: skip
    assert [a["completions"] for a in anchor_rows] == mu_samples  # sampled from μ, not from π_1
    for row, a in zip(_rows(out / "iter_1" / "train.jsonl"), anchor_rows):
        assert row["anchor_completion"] == [{"role": "assistant", "content": a["completions"][0]}]
    first = [
        next(
            h for h in json.loads((out / f"iter_{t}" / "train_metrics.json").read_text())["log_history"] if "loss" in h
        )
        for t in (0, 1)
    ]
    assert first[0]["rspo/reg_forward_kl"] == pytest.approx(0.0, abs=1e-4)
    assert abs(first[1]["rspo/reg_forward_kl"]) > 1e-3


@pytest.mark.slow
def test_sft_warm_start_continued_sft_and_evaluation_hook(runs):
    out, _ = runs("sft")
    assert (out / "sft" / "model" / "model.safetensors").exists()
    metrics = _check_iteration_outputs(out, "sft")
    assert metrics[0]["iteration"] == -1 and metrics[0]["model"] == str(out / "sft" / "model")  # the start model
    assert [m["iteration"] for m in metrics] == [-1, 0, 1]
    assert all(isinstance(m["eval"]["probe_logp_per_token"], float) for m in metrics)
    assert json.loads((out / "iter_0" / "metrics.json").read_text())["start_model"] == str(out / "sft" / "model")
    calls = _rows(out / "eval_calls.jsonl") + _rows(out / "iter_0" / "eval_calls.jsonl")
    calls += _rows(out / "iter_1" / "eval_calls.jsonl")
    assert [(c["iteration"], c["model"], c["previous"]) for c in calls] == [
        (-1, str(out / "sft" / "model"), None),
        (0, str(out / "iter_0" / "model"), str(out / "sft" / "model")),
        (1, str(out / "iter_1" / "model"), str(out / "iter_0" / "model")),
    ]
    assert all(c["prompt_template"] == "Question: {prompt}\nAnswer: " for c in calls)
    # Training changed the weights (the checkpoints are not copies of the start model).
    w_sft, w0 = _weights(out / "sft" / "model"), _weights(out / "iter_0" / "model")
    assert any(not (w_sft[k] == w0[k]).all() for k in w0)


@pytest.mark.slow
def test_resume_after_kills_equals_uninterrupted_run(runs, tmp_path):
    import torch

    reference_out, _ = runs("rspo")  # the uninterrupted run, same recipe and seeds
    out = tmp_path / "rspo-killed"
    overrides = runs.overrides("rspo")
    it0, it1 = out / "iter_0", out / "iter_1"

    launch_and_kill("recipes/tiny/rspo.yaml", out, overrides, "generate@1")
    assert (it0 / "model").exists() and not (it1 / "generations.jsonl").exists()
    assert (it1 / "generations.jsonl.tmp").exists()  # the half-written file is never taken as finished
    finished = {p: _fingerprint(p) for p in [it0 / "generations.jsonl", it0 / "preferences.jsonl"]}
    finished[it0 / "model" / "model.safetensors"] = _fingerprint(it0 / "model" / "model.safetensors")

    launch_and_kill("recipes/tiny/rspo.yaml", out, overrides, "judge@1")
    assert (it1 / "generations.jsonl").exists() and not (it1 / "preferences.jsonl").exists()
    finished[it1 / "generations.jsonl"] = _fingerprint(it1 / "generations.jsonl")

    launch_and_kill("recipes/tiny/rspo.yaml", out, overrides, "train@1")
    assert (it1 / "preferences.jsonl").exists() and not (it1 / "model").exists()
    finished[it1 / "preferences.jsonl"] = _fingerprint(it1 / "preferences.jsonl")

    launch("recipes/tiny/rspo.yaml", out, overrides)
    assert {p: _fingerprint(p) for p in finished} == finished  # finished work was not regenerated or rewritten
    for name in ("generations.jsonl", "preferences.jsonl", "train.jsonl"):
        assert _rows(it1 / name) == _rows(reference_out / "iter_1" / name)
    resumed, uninterrupted = _weights(it1 / "model"), _weights(reference_out / "iter_1" / "model")
    assert resumed.keys() == uninterrupted.keys()
    for key in resumed:
        torch.testing.assert_close(resumed[key], uninterrupted[key], rtol=0, atol=1e-6)
    assert [m["iteration"] for m in _rows(out / "metrics.jsonl")] == [0, 1]


@pytest.mark.slow
def test_killed_training_resumes_from_trainer_checkpoint(runs, tmp_path, monkeypatch, capsys):
    """With checkpoints saved during training, a kill mid-iteration resumes from the last one (not from π_t) and
    still ends with the uninterrupted run's weights."""
    import torch

    reference_out, _ = runs("spin")
    out = tmp_path / "spin-checkpointed"
    overrides = [*runs.overrides("spin"), "--training.save_strategy=steps", "--training.save_steps=1"]
    launch_and_kill("recipes/tiny/spin.yaml", out, overrides, "train@1:3")  # after step 3, before its checkpoint
    trainer_dir = out / "iter_1" / "trainer"
    assert sorted(p.name for p in trainer_dir.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert not (out / "iter_1" / "model").exists()
    # Checkpoints are resumed only with the recipe they were made with: a changed β stops the run at once.
    from trl_selfplay.cli import main

    monkeypatch.chdir(ROOT)
    changed = [
        "recipes/tiny/spin.yaml",
        f"--output_dir={out}",
        *overrides,
        "--iterations.overrides.1.training.beta=0.7",
    ]
    assert main(changed) == 2
    error = capsys.readouterr().err
    assert "checkpoints of the interrupted stage `train` of iteration 1 made with another recipe" in error
    assert "`training.beta` of iteration 1 was 0.5 and is now 0.7" in error and "--restart-from=train@1" in error
    launch("recipes/tiny/spin.yaml", out, overrides)
    history = json.loads((out / "iter_1" / "train_metrics.json").read_text())["log_history"]
    assert [h["step"] for h in history if "loss" in h] == [1, 2, 3, 4]  # steps 1-2 restored from the checkpoint
    resumed, uninterrupted = _weights(out / "iter_1" / "model"), _weights(reference_out / "iter_1" / "model")
    for key in resumed:
        torch.testing.assert_close(resumed[key], uninterrupted[key], rtol=0, atol=1e-6)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_rspo_two_processes(runs, tmp_path):
    """2 accelerate processes (gloo): generation and judging sharded and gathered in prompt order, training
    distributed."""
    single_out, _ = runs("rspo")
    out = tmp_path / "rspo-2proc"
    launch("recipes/tiny/rspo.yaml", out, runs.overrides("rspo"), num_processes=2)
    _check_iteration_outputs(out, "rspo")
    # The transformers backend seeds per (prompt, sample): the same completions as the 1-process run, and the same
    # preferences (up to float noise from the different judge batches).
    assert _rows(out / "iter_0" / "generations.jsonl") == _rows(single_out / "iter_0" / "generations.jsonl")
    for two, one in zip(
        _rows(out / "iter_0" / "preferences.jsonl"), _rows(single_out / "iter_0" / "preferences.jsonl")
    ):
        flat = [[x for row in r["preferences"] for x in row] for r in (two, one)]
        assert flat[0] == pytest.approx(flat[1], abs=1e-5)
        assert (two["chosen_index"], two["rejected_index"]) == (one["chosen_index"], one["rejected_index"])
    # 4 pairs, 2 per device: 2 processes take one optimizer step, 1 process two.
    steps = [
        json.loads((o / "iter_0" / "train_metrics.json").read_text())["log_history"][-1]["step"]
        for o in (out, single_out)
    ]
    assert steps == [1, 2]
