"""Common interface of preference judges: a K×K matrix of P(y_i ≻ y_j | x) per prompt."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch


def check_judge_inputs(prompts: Sequence[str], completions: Sequence[Sequence[str]]) -> int:
    """Validate `prompts` / `completions` and return K (completions per prompt)."""
    if isinstance(prompts, str) or len(prompts) != len(completions):
        raise ValueError(
            f"`prompts` and `completions` must be lists of the same length (one list of K completions per prompt), "
            f"got {len(prompts) if not isinstance(prompts, str) else 'a single string'} prompts and "
            f"{len(completions)} completion lists."
        )
    sizes = {len(c) for c in completions}
    if len(sizes) > 1:
        raise ValueError(f"Every prompt needs the same number K of completions, got sizes {sorted(sizes)}.")
    for p in prompts:
        if not isinstance(p, str):
            raise ValueError(f"Judges take plain-text prompts, got a {type(p).__name__}; pass the prompt text.")
    for cands in completions:
        if isinstance(cands, str) or any(not isinstance(c, str) for c in cands):
            raise ValueError("`completions[n]` must be a list of K strings.")
    return sizes.pop() if sizes else 0


class PreferenceJudge(ABC):
    """A judge that compares the K completions of each prompt pairwise."""

    @abstractmethod
    def preference_matrix(self, prompts: list[str], completions: list[list[str]]) -> torch.Tensor:
        """Return a float tensor of shape [N, K, K] whose entry [n, i, j] is P(y_i ≻ y_j | x_n); diagonal ½."""
