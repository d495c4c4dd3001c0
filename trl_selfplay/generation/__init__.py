"""Sampling K completions per prompt: transformers (CPU/GPU, multi-process) and vLLM backends.

Modules, each importing only those above it: `prompts` (formatting, tokenisation, the judge's source text) and
`seeding` (per-row seeds and sampling noise); `base` (output type, argument checks); the backends `hf` and `vllm`;
`dispatch` (`generate_completions`, importing a backend only when it is used).
"""

from trl_selfplay.generation.base import BACKENDS, GenerationOutput, check_generation_arguments, is_vllm_available
from trl_selfplay.generation.dispatch import generate_completions
from trl_selfplay.generation.prompts import encode_prompt, format_prompt, judge_source_text

__all__ = [
    "BACKENDS",
    "GenerationOutput",
    "check_generation_arguments",
    "encode_prompt",
    "format_prompt",
    "generate_completions",
    "is_vllm_available",
    "judge_source_text",
]
