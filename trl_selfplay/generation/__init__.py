"""Sampling K completions per prompt: transformers (CPU/GPU, multi-process) and vLLM backends."""

from trl_selfplay.generation.base import BACKENDS, GenerationOutput, generate_completions
from trl_selfplay.generation.prompts import encode_prompt, format_prompt

__all__ = ["BACKENDS", "GenerationOutput", "encode_prompt", "format_prompt", "generate_completions"]
