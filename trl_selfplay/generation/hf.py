"""transformers backend: batched `model.generate`, left padding, length-sorted batches, accelerate sharding.

Sampling is seeded per (prompt, sample) by `seeding.SeededSampler` (Gumbel-max inside a logits processor, `generate`
itself decoding greedily), so two processes return exactly what one returns. Temperature 0 is plain greedy decoding.
"""

from __future__ import annotations

from typing import Any

import torch

from trl_selfplay.generation.base import GenerationOutput
from trl_selfplay.generation.prompts import Prompt, encode_prompt, format_prompt
from trl_selfplay.generation.seeding import SeededSampler, mix_seeds
from trl_selfplay.models import default_device, default_dtype, load_causal_lm, load_tokenizer

__all__ = ["generate_transformers"]


def _process_info(accelerator: Any) -> tuple[int, int, bool]:
    if accelerator is None:
        return 0, 1, True
    return accelerator.process_index, accelerator.num_processes, accelerator.is_main_process


def _load(
    model: Any, tokenizer: Any, accelerator: Any, dtype: Any, device: Any, revision: Any, trust_remote_code: bool
):
    """(model, tokenizer): a path is loaded with `trl_selfplay.models` on `device` (default: the accelerator's, else
    the best available) in `dtype` (default: the checkpoint's on a GPU, float32 on the CPU)."""
    if isinstance(model, str):
        if tokenizer is None:
            tokenizer = load_tokenizer(model, revision=revision, trust_remote_code=trust_remote_code)
        if device is None:
            device = accelerator.device if accelerator is not None else default_device()
        device = torch.device(device)
        model = load_causal_lm(
            model,
            dtype=default_dtype(device) if dtype is None else dtype,
            revision=revision,
            trust_remote_code=trust_remote_code,
            device=device,
        )
    elif accelerator is not None and hasattr(accelerator, "unwrap_model"):
        model = accelerator.unwrap_model(model)
    return model, tokenizer


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    ids: set[int] = set()
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    elif eos:
        ids.update(eos)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)


def generate_transformers(
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
    batch_size: int = 16,
    accelerator: Any = None,
    dtype: Any = None,
    device: Any = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> GenerationOutput:
    """See `generate_completions`; this is its `backend="transformers"` path."""
    from tqdm.auto import tqdm
    from transformers import GenerationConfig, LogitsProcessorList

    model, tokenizer = _load(model, tokenizer, accelerator, dtype, device, revision, trust_remote_code)
    formatted = [format_prompt(tokenizer, p, prompt_template) for p in prompts]
    encoded = [encode_prompt(tokenizer, p, prompt_template, add_special_tokens) for p in prompts]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos_ids = _eos_ids(model, tokenizer)
    if pad_id is None:
        raise ValueError("The tokenizer has neither a pad nor an eos token; set `tokenizer.pad_token`.")

    rank, world, is_main = _process_info(accelerator)
    local = list(range(rank, len(prompts), world))  # strided shard: balances lengths across processes
    # Longest prompts first: similar lengths share a batch (little padding) and an out-of-memory shows up at once.
    local.sort(key=lambda i: -len(encoded[i]))
    rows = [(i, k) for i in local for k in range(num_samples)]

    generation_config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,  # sampling happens in SeededSampler (Gumbel-max), generate only takes the argmax
        num_beams=1,
        pad_token_id=pad_id,
        eos_token_id=eos_ids or None,
    )
    device = next(model.parameters()).device
    results: dict[tuple[int, int], tuple[str, int]] = {}
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            # Only pass `disable` on other ranks: an explicit value would override TQDM_DISABLE on the main one.
            bar = tqdm(total=len(rows), desc="Generating", unit="seq", **({} if is_main else {"disable": True}))
            for start in range(0, len(rows), batch_size):
                batch = rows[start : start + batch_size]
                width = max(len(encoded[i]) for i, _ in batch)
                input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
                attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
                for row, (i, _) in enumerate(batch):  # left padding
                    ids = encoded[i]
                    input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
                    attention_mask[row, width - len(ids) :] = 1
                sampler = SeededSampler([mix_seeds(seed, i, k) for i, k in batch], width, temperature, top_p)
                output = model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=attention_mask.to(device),
                    generation_config=generation_config,
                    logits_processor=LogitsProcessorList([sampler]),
                )
                new_tokens = output[:, width:].cpu().tolist()
                for (i, k), tokens in zip(batch, new_tokens):
                    end = next((pos for pos, tok in enumerate(tokens) if tok in eos_ids), None)
                    count = len(tokens) if end is None else end + 1
                    text_tokens = tokens[: end if end is not None else count]
                    results[(i, k)] = (tokenizer.decode(text_tokens, skip_special_tokens=True), count)
                bar.update(len(batch))
            bar.close()
    finally:
        model.train(was_training)

    local_items = [(i, [results[(i, k)] for k in range(num_samples)]) for i in local]
    if world > 1:
        from accelerate.utils import gather_object

        local_items = gather_object(local_items)
    by_index = dict(local_items)
    completions = [[text for text, _ in by_index[i]] for i in range(len(prompts))]
    num_tokens = [[count for _, count in by_index[i]] for i in range(len(prompts))]
    return GenerationOutput(completions=completions, num_tokens=num_tokens, prompts=formatted)
