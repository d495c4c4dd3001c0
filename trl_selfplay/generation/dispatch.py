"""`generate_completions`: one entry point for sampling K completions per prompt, whatever the backend.

Checks every argument first, then imports the chosen backend (`hf` or `vllm`) only when it is called: the backends
import `base`, `prompts` and `seeding`, never this module.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from trl_selfplay.generation.base import GenerationOutput, check_generation_arguments
from trl_selfplay.generation.prompts import Prompt

__all__ = ["generate_completions"]


def generate_completions(
    model: Any,
    prompts: Sequence[Prompt],
    *,
    tokenizer: Any = None,
    backend: str = "transformers",
    num_samples: int = 1,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 256,
    seed: int = 0,
    prompt_template: str | None = None,
    add_special_tokens: bool | None = None,
    batch_size: int = 16,
    accelerator: Any = None,
    **backend_kwargs: Any,
) -> GenerationOutput:
    """Sample `num_samples` completions for every prompt.

    Args:
        model: a path / Hub name, or a loaded `PreTrainedModel` (transformers backend; the vLLM backend saves a loaded
            model to a temporary directory first).
        prompts: plain strings or conversations (lists of `{"role", "content"}` messages).
        tokenizer: the model's tokenizer; loaded from `model` when it is a path and this is `None`.
        backend: `"transformers"` (batched `generate`, works everywhere) or `"vllm"` (needs the `vllm` extra).
        num_samples: K, completions per prompt.
        temperature: sampling temperature; 0 decodes greedily in both backends (K identical completions).
        top_p: nucleus sampling threshold (ignored when decoding greedily).
        max_new_tokens: generation budget per completion.
        seed: sampling seed. The transformers backend derives one noise stream per (prompt, sample) from it, so a
            completion does not depend on batch size, batch composition or the number of processes; the vLLM
            backend one sampling seed per prompt.
        prompt_template: `None` for the tokenizer's chat template, or a string with `{prompt}` (plain-string prompts).
        add_special_tokens: whether the tokenizer adds its special tokens (BOS) to the formatted prompt. `None`:
            only for a fixed `prompt_template`, as TRL tokenises plain text (a chat template renders its own BOS);
            `False` / `True` force it (uclaml/SPIN's `spin/generate.py` uses `False`). See `encode_prompt`.
        batch_size: sequences per `generate` call (transformers backend).
        accelerator: optional `accelerate.Accelerator` / `PartialState`. Both backends then split the prompts
            across processes and gather the results, in prompt order, on every process; vLLM runs one engine per
            `tensor_parallel_size` processes through its external launcher (data parallel).
        **backend_kwargs: transformers: `dtype`, `device`, `revision`, `trust_remote_code` (used when `model` is a
            path); vLLM: `tensor_parallel_size`, `gpu_memory_utilization`, `dtype`, `max_model_len`, and any other
            `vllm.LLM` argument.

    Returns:
        A `GenerationOutput` with `completions[n][k]` and `num_tokens[n][k]`.
    """
    if isinstance(model, os.PathLike):
        model = os.fspath(model)
    prompts = list(prompts) if not isinstance(prompts, str) else prompts
    check_generation_arguments(
        model,
        prompts,
        tokenizer=tokenizer,
        backend=backend,
        num_samples=num_samples,
        temperature=temperature,
        top_p=top_p,
        max_new_tokens=max_new_tokens,
        prompt_template=prompt_template,
        add_special_tokens=add_special_tokens,
        batch_size=batch_size,
    )
    common = {
        "tokenizer": tokenizer,
        "num_samples": num_samples,
        "temperature": temperature,
        "top_p": top_p,
        "max_new_tokens": max_new_tokens,
        "seed": seed,
        "prompt_template": prompt_template,
        "add_special_tokens": add_special_tokens,
        "accelerator": accelerator,
    }
    if backend == "vllm":
        from trl_selfplay.generation.vllm import generate_vllm

        return generate_vllm(model, prompts, **common, **backend_kwargs)
    from trl_selfplay.generation.hf import generate_transformers

    return generate_transformers(model, prompts, batch_size=batch_size, **common, **backend_kwargs)
