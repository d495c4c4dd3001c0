"""One interface for sampling K completions per prompt, with a transformers and a vLLM backend."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from trl_selfplay.generation.prompts import Prompt, validate_prompt_template

BACKENDS = ("transformers", "vllm")


@dataclass
class GenerationOutput:
    """K completions per prompt, in prompt order.

    Attributes:
        completions: `completions[n][k]` is the k-th sampled completion of prompt n (text without the prompt and
            without the end-of-sequence token).
        num_tokens: `num_tokens[n][k]` is the number of generated tokens of that completion, up to and including the
            end-of-sequence token when one was generated (`max_new_tokens` when it was cut).
        prompts: the formatted prompt strings generation conditioned on (see `format_prompt`).
    """

    completions: list[list[str]]
    num_tokens: list[list[int]]
    prompts: list[str] = field(default_factory=list)


def _check_common(
    model: Any,
    prompts: Sequence[Prompt],
    tokenizer: Any,
    backend: str,
    num_samples: int,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    prompt_template: str | None,
    batch_size: int,
) -> None:
    """All argument errors, raised before any model is loaded."""
    if backend not in BACKENDS:
        raise ValueError(f"`backend` must be one of {BACKENDS}, got {backend!r}.")
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise ValueError("`prompts` must be a list of prompts (strings or conversations), not a single string.")
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"`num_samples` must be a positive integer, got {num_samples!r}.")
    if temperature < 0:
        raise ValueError(f"`temperature` must be >= 0 (0 means greedy decoding), got {temperature!r}.")
    if not 0 < top_p <= 1:
        raise ValueError(f"`top_p` must be in (0, 1], got {top_p!r}.")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"`max_new_tokens` must be a positive integer, got {max_new_tokens!r}.")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
    validate_prompt_template(prompt_template)
    if prompt_template is not None and any(not isinstance(p, str) for p in prompts):
        raise ValueError(
            "`prompt_template` fills plain-string prompts, but some prompts are conversations; "
            "pass strings or set `prompt_template=None` to use the chat template."
        )
    if not isinstance(model, str) and tokenizer is None:
        raise ValueError("`tokenizer` is required when `model` is a loaded model (it is loaded only from a path).")
    if backend == "transformers" and not isinstance(model, str) and not hasattr(model, "generate"):
        raise ValueError(f"`model` must be a path/name or a `PreTrainedModel`, got {type(model).__name__}.")


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
        temperature: sampling temperature; 0 decodes greedily.
        top_p: nucleus sampling threshold.
        max_new_tokens: generation budget per completion.
        seed: sampling seed. The transformers backend derives one noise stream per (prompt, sample) from it, so a
            completion does not depend on batch size, batch composition or the number of processes; the vLLM
            backend one sampling seed per prompt.
        prompt_template: `None` for the tokenizer's chat template, or a string with `{prompt}` (plain-string prompts).
        batch_size: sequences per `generate` call (transformers backend).
        accelerator: optional `accelerate.Accelerator` / `PartialState`. Both backends then split the prompts
            across processes and gather the results, in prompt order, on every process; vLLM runs one engine per
            `tensor_parallel_size` processes through its external launcher (data parallel).
        **backend_kwargs: transformers: `dtype`, `device`; vLLM: `tensor_parallel_size`, `gpu_memory_utilization`,
            `dtype`, `max_model_len`, and any other `vllm.LLM` argument.

    Returns:
        A `GenerationOutput` with `completions[n][k]` and `num_tokens[n][k]`.
    """
    if isinstance(model, os.PathLike):
        model = os.fspath(model)
    prompts = list(prompts) if not isinstance(prompts, str) else prompts
    _check_common(
        model,
        prompts,
        tokenizer,
        backend,
        num_samples,
        temperature,
        top_p,
        max_new_tokens,
        prompt_template,
        batch_size,
    )
    common = {
        "tokenizer": tokenizer,
        "num_samples": num_samples,
        "temperature": temperature,
        "top_p": top_p,
        "max_new_tokens": max_new_tokens,
        "seed": seed,
        "prompt_template": prompt_template,
        "accelerator": accelerator,
    }
    if backend == "vllm":
        from trl_selfplay.generation.vllm import generate_vllm

        return generate_vllm(model, prompts, **common, **backend_kwargs)
    from trl_selfplay.generation.hf import generate_transformers

    return generate_transformers(model, prompts, batch_size=batch_size, **common, **backend_kwargs)
