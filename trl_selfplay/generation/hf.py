"""transformers backend: batched `model.generate`, left padding, length-sorted batches, accelerate sharding.

Sampling is done with the Gumbel-max trick inside a logits processor: at each step the temperature-scaled, top-p
filtered logits of a row get Gumbel noise that is a hash of (seed, prompt index, sample index, step, token), and
`generate` then picks the argmax. argmax(logits + Gumbel) is an exact sample of softmax(logits), and because the
noise of a row depends only on its own identity, a completion is the same whatever batch, batch size or process it
lands in: two processes return exactly what one returns.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from trl_selfplay.generation.base import GenerationOutput
from trl_selfplay.generation.prompts import Prompt, encode_prompt, format_prompt

_MASK64 = (1 << 64) - 1


def _mix(*values: int) -> int:
    """Deterministic 63-bit hash of integers (splitmix64 steps); Python's `hash` is not stable across processes."""
    state = 0x9E3779B97F4A7C15
    for value in values:
        state = (state ^ (value & _MASK64)) & _MASK64
        state = (state + 0x9E3779B97F4A7C15) & _MASK64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        state = z ^ (z >> 31)
    return state & ((1 << 63) - 1)


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= (1 << 63) else value


_GOLDEN, _M1, _M2 = (_signed(c) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 tensors (torch's `>>` is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def hashed_uniform(keys: torch.Tensor, vocab: int) -> torch.Tensor:
    """Uniform(0, 1) noise of shape [len(keys), vocab], a pure function of (key, token index).

    A counter-based generator (splitmix64's finaliser on key + (index + 1)·golden ratio, int64 arithmetic wrapping
    modulo 2^64) computed in one vectorised pass on the logits' device: no per-row Python loop and no host-to-device
    copy per step.
    """
    index = torch.arange(1, vocab + 1, device=keys.device, dtype=torch.int64)
    z = keys[:, None] + index[None, :] * _GOLDEN
    z = (z ^ _shift_right(z, 30)) * _M1
    z = (z ^ _shift_right(z, 27)) * _M2
    z = z ^ _shift_right(z, 31)
    return (_shift_right(z, 11).double() + 0.5) / float(1 << 53)


class SeededSampler:
    """Logits processor turning greedy search into per-row seeded sampling (temperature, top-p, Gumbel-max)."""

    def __init__(self, row_seeds: Sequence[int], prompt_width: int, temperature: float, top_p: float):
        self.row_seeds = list(row_seeds)
        self.prompt_width = prompt_width
        self.temperature = temperature
        self.top_p = top_p

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.temperature == 0:
            return scores  # greedy
        scores = scores.float() / self.temperature
        if self.top_p < 1.0:
            sorted_scores, sorted_idx = torch.sort(scores, dim=-1, descending=True)
            probs = sorted_scores.softmax(dim=-1)
            # Drop a token when the mass before it already reaches top_p; the most likely token always stays.
            drop_sorted = (probs.cumsum(dim=-1) - probs) >= self.top_p
            drop = torch.zeros_like(drop_sorted).scatter(-1, sorted_idx, drop_sorted)
            scores = scores.masked_fill(drop, -math.inf)
        step = input_ids.shape[1] - self.prompt_width
        keys = torch.tensor([_signed(_mix(seed, step)) for seed in self.row_seeds], device=scores.device)
        gumbel = -torch.log(-torch.log(hashed_uniform(keys, scores.shape[-1])))
        return scores + gumbel.to(scores.dtype)


def _process_info(accelerator: Any) -> tuple[int, int, bool]:
    if accelerator is None:
        return 0, 1, True
    return accelerator.process_index, accelerator.num_processes, accelerator.is_main_process


def _default_device(accelerator: Any) -> torch.device:
    if accelerator is not None:
        return torch.device(accelerator.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _load(model: Any, tokenizer: Any, accelerator: Any, dtype: Any, device: Any):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(model)
    if isinstance(model, str):
        device = torch.device(device) if device is not None else _default_device(accelerator)
        if dtype is None:
            dtype = "auto" if device.type == "cuda" else torch.float32
        model = AutoModelForCausalLM.from_pretrained(model, dtype=dtype).to(device)
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
    batch_size: int = 16,
    accelerator: Any = None,
    dtype: Any = None,
    device: Any = None,
) -> GenerationOutput:
    """See `generate_completions`; this is its `backend="transformers"` path."""
    from tqdm.auto import tqdm
    from transformers import GenerationConfig, LogitsProcessorList

    model, tokenizer = _load(model, tokenizer, accelerator, dtype, device)
    formatted = [format_prompt(tokenizer, p, prompt_template) for p in prompts]
    encoded = [encode_prompt(tokenizer, p, prompt_template) for p in prompts]
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
                sampler = SeededSampler([_mix(seed, i, k) for i, k in batch], width, temperature, top_p)
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
