"""The one model/tokenizer loader: `from_pretrained` arguments, dtype, device, eval mode, pinned revisions, and no
checkpoint code run unless asked."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trl_selfplay.models import default_dtype, load_causal_lm, load_tokenizer, model_init_kwargs


def test_model_init_kwargs():
    assert model_init_kwargs() == {"dtype": "auto", "trust_remote_code": False}
    assert model_init_kwargs(dtype="bfloat16", revision="abc123", trust_remote_code=True) == {
        "dtype": torch.bfloat16,
        "trust_remote_code": True,
        "revision": "abc123",
    }
    assert model_init_kwargs(dtype=torch.float16)["dtype"] is torch.float16
    with pytest.raises(ValueError, match="`dtype` must be one of"):
        model_init_kwargs(dtype="bf16")
    with pytest.raises(ValueError, match="`trust_remote_code`"):
        model_init_kwargs(trust_remote_code="yes")


def test_default_dtype_is_float32_on_cpu():
    assert default_dtype("cpu") == "float32"
    assert default_dtype(torch.device("cuda", 0)) == "auto"


def test_load_causal_lm_dtype_device_and_eval_mode(tiny_model_path):
    model = load_causal_lm(tiny_model_path, dtype="bfloat16", device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert not model.training and not any(m.training for m in model.modules())
    # The tiny checkpoint is saved in float32: "auto" keeps it.
    assert next(load_causal_lm(tiny_model_path).parameters()).dtype == torch.float32
    tokenizer = load_tokenizer(tiny_model_path)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.chat_template is not None


# Run in a fresh interpreter: the Hub cache and the modules cache are read from the environment at import time.
_HUB_SCRIPT = """
import json, sys
import torch
from trl_selfplay.models import load_causal_lm, load_tokenizer

first, second = sys.argv[1], sys.argv[2]
weights = {}
for sha in (first, second):
    model = load_causal_lm("org/tiny", revision=sha)
    weights[sha] = model.get_input_embeddings().weight.sum().item()
    load_tokenizer("org/tiny", revision=sha)
try:
    load_causal_lm(sys.argv[3], trust_remote_code=True)
    ran = False
except RuntimeError as error:
    ran = "checkpoint code ran" in str(error)
print(json.dumps({"weights": weights, "default_class": type(load_causal_lm(sys.argv[3])).__name__, "ran": ran}))
"""


def test_revision_pins_the_snapshot_and_remote_code_is_off_by_default(tmp_path):
    from trl_selfplay.testing import make_tiny_causal_lm

    # An offline Hub cache holding two commits of one repository, with different weights.
    repo = tmp_path / "hub" / "models--org--tiny"
    shas = ["a" * 40, "b" * 40]
    for seed, sha in enumerate(shas):
        make_tiny_causal_lm(repo / "snapshots" / sha, seed=seed)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(shas[1])
    expected = {}
    for sha in shas:
        model = load_causal_lm(str(repo / "snapshots" / sha))
        expected[sha] = model.get_input_embeddings().weight.sum().item()
    assert expected[shas[0]] != expected[shas[1]]

    # A checkpoint that ships its own code: it must run only with trust_remote_code=True.
    custom = make_tiny_causal_lm(tmp_path / "custom")
    config = json.loads((custom / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "custom_code.Config", "AutoModelForCausalLM": "custom_code.Model"}
    (custom / "config.json").write_text(json.dumps(config))
    (custom / "custom_code.py").write_text("raise RuntimeError('checkpoint code ran')\n")

    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_CACHE": str(tmp_path / "hub"),
        "HF_MODULES_CACHE": str(tmp_path / "modules"),
        "PYTHONPATH": f"{Path(__file__).resolve().parents[1]}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    result = subprocess.run(
        [sys.executable, "-c", _HUB_SCRIPT, *shas, str(custom)], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["weights"] == pytest.approx(expected)
    assert out["default_class"] == "Qwen2ForCausalLM"  # the checkpoint's own code was ignored
    assert out["ran"]  # and is what trust_remote_code=True executes
