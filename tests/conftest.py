"""Shared fixtures: tiny models built locally, never downloaded."""

import os

# Fail fast on any stray Hub call; set before transformers/datasets are imported by a test module.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory):
    """A tiny Qwen2 causal LM and its tokenizer, saved to disk and loaded by path like a user's model."""
    from trl_selfplay.testing import make_tiny_causal_lm

    return str(make_tiny_causal_lm(tmp_path_factory.mktemp("tiny-qwen2")))


@pytest.fixture(scope="session")
def tiny_llama_path(tmp_path_factory):
    """A tiny Llama causal LM (head_dim 32) and its tokenizer."""
    from trl_selfplay.testing import make_tiny_causal_lm

    return str(make_tiny_causal_lm(tmp_path_factory.mktemp("tiny-llama"), architecture="llama"))


@pytest.fixture(scope="session")
def perturbed_model_path(tiny_model_path, tmp_path_factory):
    """The tiny model with noise added to every weight: a policy that differs from its reference (so log-ratios,
    and the IRIS weights, are far from their values at the fixed point)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    path = tmp_path_factory.mktemp("perturbed")
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_model_path).save_pretrained(path)
    return str(path)
