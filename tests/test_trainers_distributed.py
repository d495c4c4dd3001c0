"""Real multi-process runs of the trainers: 2 accelerate processes (gloo, CPU) and DeepSpeed ZeRO-2/ZeRO-3 on CPU."""

import importlib.util
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "trainers_distributed.py"
ZERO2_CONFIG = ROOT / "tests" / "configs" / "trainers_zero2_cpu.yaml"
ZERO3_CONFIG = ROOT / "tests" / "configs" / "trainers_zero3_cpu.yaml"


_PORT_TAKEN = re.compile(r"address already in use|EADDRINUSE", re.IGNORECASE)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(
    launch_args: list[str],
    script_args: list[str],
    extra_env: dict | None = None,
    timeout: int = 540,
    expect_success: bool = True,
) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    env.update(PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", **(extra_env or {}))
    env.update(HF_HUB_OFFLINE="1", TQDM_DISABLE="1", OMP_NUM_THREADS="1")
    for _attempt in range(3):
        command = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            *launch_args,
            "--main_process_port",
            str(_free_port()),
            str(SCRIPT),
            *script_args,
        ]
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
        # The port is free when picked but released before the launcher binds it: another process may take it in
        # between. Only that failure is retried, on a new port.
        if result.returncode == 0 or not _PORT_TAKEN.search(result.stderr):
            break
    if expect_success:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


def _load_script():
    spec = importlib.util.spec_from_file_location("trainers_distributed", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.multiprocess
def test_iris_two_processes_match_one_process_on_the_global_batch(perturbed_model_path, tiny_model_path, tmp_path):
    out_file = tmp_path / "ddp" / "result.pt"
    out_file.parent.mkdir()
    # `--multi_gpu` is accelerate's multi-process launcher; ACCELERATE_USE_CPU makes it CPU + gloo.
    _launch(
        ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no"],
        ["iris-grad", perturbed_model_path, tiny_model_path, str(out_file)],
        extra_env={"ACCELERATE_USE_CPU": "true"},
    )
    ddp = torch.load(out_file, weights_only=False)
    assert ddp["world_size"] == 2

    single = _load_script().iris_gradient(
        perturbed_model_path, tiny_model_path, str(tmp_path / "single"), per_device_batch=8
    )
    assert single["world_size"] == 1
    # Weights far from uniform: per-process weights would give a different gradient.
    assert single["ess_generated"] < 6.0 and ddp["ess_generated"] == pytest.approx(single["ess_generated"], rel=1e-5)
    # The logged loss is the true global objective on both.
    assert ddp["loss"] == pytest.approx(single["loss"], rel=1e-5)
    assert ddp["objective"] == pytest.approx(single["objective"], rel=1e-5)
    assert ddp["grads"].keys() == single["grads"].keys() and len(single["grads"]) > 0
    for name, grad in single["grads"].items():
        torch.testing.assert_close(ddp["grads"][name], grad, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_deepspeed_zero2_smoke(tiny_model_path, tmp_path):
    """SPIN under DeepSpeed ZeRO-2 on CPU through accelerate, 2 processes (the first run compiles a DeepSpeed op)."""
    out_file = tmp_path / "result.pt"
    _launch(["--config_file", str(ZERO2_CONFIG)], ["smoke", tiny_model_path, str(out_file)])
    result = torch.load(out_file, weights_only=False)
    assert result["deepspeed"] and result["distributed_type"] == "DistributedType.DEEPSPEED"
    assert result["zero_stage"] == 2 and result["world_size"] == 2
    assert result["ref_model_is_none"]  # reference precomputed through TRL's DeepSpeed inference engine
    assert len(result["losses"]) == 3 and all(torch.isfinite(torch.tensor(result["losses"])))
    assert result["losses"][0] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at step 1: log 2
    assert result["changed"] == result["num_params"]


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("logprob_impl", ["direct", "fused"])
def test_deepspeed_zero3_two_processes(tiny_model_path, tmp_path, logprob_impl):
    """SPIN under DeepSpeed ZeRO-3 on CPU, 2 processes, model loaded partitioned: the reference precompute (TRL's
    inference engine) and training (the training engine) both through `logprob_impl`."""
    out_file = tmp_path / "result.pt"
    _launch(["--config_file", str(ZERO3_CONFIG)], ["smoke-impl", tiny_model_path, logprob_impl, str(out_file)])
    result = torch.load(out_file, weights_only=False)
    assert result["deepspeed"] and result["zero_stage"] == 3
    assert result["world_size"] == 2  # the gloo default: accelerate counts both processes
    assert result["ref_model_is_none"]
    # The precomputed reference log-probs equal those of a plain single-process run of the same path.
    single = _load_script().reference_logps(tiny_model_path, str(tmp_path / "single"), logprob_impl=logprob_impl)
    for name, values in single.items():
        torch.testing.assert_close(torch.tensor(result["ref_logps"][name]), torch.tensor(values), atol=1e-4, rtol=1e-5)
    losses = torch.tensor(result["losses"])
    assert len(losses) == 3 and torch.isfinite(losses).all()
    # Step 1: policy == reference, so the training forward reproduces the precompute and the loss is log 2.
    assert result["losses"][0] == pytest.approx(0.6931, abs=1e-3)
    # Full (gathered) parameters, not the 1-D shards, and every one of them was updated.
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    assert result["shapes"] == {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert result["changed"] == result["num_params"]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_rspo_forward_kl_under_deepspeed_zero3_two_processes(perturbed_model_path, tiny_model_path, tmp_path):
    """RSPO's forward KL runs a second policy forward per step (on the μ samples) before the backward; under
    ZeRO-3 with 2 processes it gathers the partitioned parameters for both, and matches a 1-process run."""
    out_file = tmp_path / "result.pt"
    _launch(
        ["--config_file", str(ZERO3_CONFIG)], ["rspo-forward-kl", perturbed_model_path, tiny_model_path, str(out_file)]
    )
    result = torch.load(out_file, weights_only=False)
    assert result["zero_stage"] == 3 and result["world_size"] == 2
    # Same global batch of 4 at step 1 (2 per process) as one process with 4: same μ log-probs, regularizer, loss.
    single = _load_script().rspo_forward_kl(
        perturbed_model_path, tiny_model_path, str(tmp_path / "single"), max_steps=1, per_device_train_batch_size=4
    )
    torch.testing.assert_close(
        torch.tensor(result["anchor_completion_logps"]), torch.tensor(single["anchor_completion_logps"]),
        atol=1e-4, rtol=1e-5,
    )  # fmt: skip
    assert abs(single["reg_forward_kl"][0]) > 1e-2  # the policy is a perturbed μ: a non-trivial value
    assert result["reg_forward_kl"][0] == pytest.approx(single["reg_forward_kl"][0], rel=1e-4)
    assert result["losses"][0] == pytest.approx(single["losses"][0], rel=1e-4)
    assert len(result["losses"]) == 3 and torch.isfinite(torch.tensor(result["losses"])).all()
    assert result["changed"] == result["num_params"]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_prefix_sharing_under_deepspeed_zero3_two_processes(perturbed_model_path, tiny_model_path, tmp_path):
    """Prefix sharing under ZeRO-3 with 2 processes: the reference and anchor passes and the training forward pack
    each prompt with its chosen, rejected and μ sample into ONE row; the columns, the loss and the first update (SGD,
    lr 1: minus the clipped gradient) equal those of an unshared single-process run on the same global batch."""
    out_file = tmp_path / "result.pt"
    _launch(
        ["--config_file", str(ZERO3_CONFIG)],
        ["rspo-one-update", perturbed_model_path, tiny_model_path, "on", str(out_file)],
    )
    result = torch.load(out_file, weights_only=False)
    assert result["zero_stage"] == 3 and result["world_size"] == 2
    # One policy forward in the step: 2 rows per process, each holding a prompt and its 3 responses.
    assert len(result["shapes"]) == 1 and result["shapes"][0][0] == 2
    assert result["attn_implementation"] == "trl_selfplay_sdpa"  # the rows attended block by block, no 4D mask
    single = _load_script().rspo_one_update(
        perturbed_model_path,
        tiny_model_path,
        str(tmp_path / "single"),
        prefix_sharing="off",
        per_device_train_batch_size=4,
    )
    assert [shape[0] for shape in single["shapes"]] == [8, 4]  # unshared: the pairs, then the μ samples
    for name, values in single["columns"].items():
        torch.testing.assert_close(torch.tensor(result["columns"][name]), torch.tensor(values), atol=1e-5, rtol=1e-5)
    assert abs(single["reg_forward_kl"][0]) > 1e-2  # the policy is a perturbed μ
    assert result["reg_forward_kl"][0] == pytest.approx(single["reg_forward_kl"][0], rel=1e-5)
    assert result["losses"][0] == pytest.approx(single["losses"][0], rel=1e-5)
    assert result["update"].keys() == single["update"].keys()
    assert all(update.abs().max() > 0 for update in single["update"].values())
    for name, update in single["update"].items():
        torch.testing.assert_close(result["update"][name], update, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.multiprocess
def test_deepspeed_zero3_with_use_cpu_is_rejected(tiny_model_path, tmp_path):
    """ACCELERATE_USE_CPU disables DeepSpeed in accelerate while transformers still loads the model partitioned
    (the first forward would fail with "'weight' must be 2-D"); the config says so and how to fix it."""
    result = _launch(
        ["--config_file", str(ZERO3_CONFIG)],
        ["smoke-impl", tiny_model_path, "direct", str(tmp_path / "result.pt")],
        extra_env={"ACCELERATE_USE_CPU": "true"},
        expect_success=False,
    )
    assert result.returncode != 0
    assert "ValueError: DeepSpeed ZeRO-3 is configured but `use_cpu`/ACCELERATE_USE_CPU is set" in result.stderr
    assert "must be 2-D" not in result.stderr
