"""Seeds and sampling noise that depend only on a row's identity, never on the batch or process it runs in.

`mix_seeds` derives one integer seed from several (the run seed, a prompt index, a sample index, a step); both
backends use it, so a prompt's samples do not depend on the other prompts of the call. `SeededSampler` is the
transformers backend's sampler: the Gumbel-max trick inside a logits processor. At each step the temperature-scaled,
top-p filtered logits of a row get Gumbel noise that is a hash of (seed, prompt index, sample index, step, token),
and `generate` then picks the argmax. argmax(logits + Gumbel) is an exact sample of softmax(logits), and because the
noise of a row depends only on its own identity, a completion is the same whatever batch, batch size or process it
lands in.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["SeededSampler", "hashed_uniform", "mix_seeds"]

_MASK64 = (1 << 64) - 1


def mix_seeds(*values: int) -> int:
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
    """The int64 with the same 64 bits (torch has no uint64 arithmetic)."""
    return value - (1 << 64) if value >= (1 << 63) else value


_GOLDEN, _M1, _M2 = (_signed(c) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 tensors (torch's `>>` is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def hashed_uniform(keys: torch.Tensor, vocab: int) -> torch.Tensor:
    """Uniform(0, 1) noise of shape [len(keys), vocab], a pure function of (key, token index).

    A counter-based generator (splitmix64's finaliser on key + (index + 1)·golden ratio, int64 arithmetic wrapping
    modulo 2^64) computed in one vectorised pass on the keys' device: no per-row Python loop and no host-to-device
    copy per step.
    """
    index = torch.arange(1, vocab + 1, device=keys.device, dtype=torch.int64)
    z = keys[:, None] + index[None, :] * _GOLDEN
    z = (z ^ _shift_right(z, 30)) * _M1
    z = (z ^ _shift_right(z, 27)) * _M2
    z = z ^ _shift_right(z, 31)
    return (_shift_right(z, 11).double() + 0.5) / float(1 << 53)


class SeededSampler:
    """Logits processor turning greedy search into per-row seeded sampling (temperature, top-p, Gumbel-max).

    Args:
        row_seeds: one seed per batch row (e.g. `mix_seeds(seed, prompt_index, sample_index)`).
        prompt_width: width of the (left-padded) prompt, so the step index is `input_ids.shape[1] - prompt_width`.
        temperature: 0 leaves the logits untouched, so `generate`'s argmax is greedy decoding.
        top_p: nucleus threshold in (0, 1].
    """

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
        keys = torch.tensor([_signed(mix_seeds(seed, step)) for seed in self.row_seeds], device=scores.device)
        gumbel = -torch.log(-torch.log(hashed_uniform(keys, scores.shape[-1])))
        return scores + gumbel.to(scores.dtype)
