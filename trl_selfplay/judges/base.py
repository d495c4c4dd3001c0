"""Common interface of preference judges: a K×K matrix of P(y_i ≻ y_j | x) per prompt."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

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
    """A judge that compares the K completions of each prompt pairwise.

    `mode` picks how :meth:`preferences` turns the judge's output into the preference matrix, the win probabilities
    and the chosen / rejected pair: `"pairwise"` (from :meth:`preference_matrix`, pair by win rate) or
    `"aggregate"` (the SPPO/RSPO pipeline: from per-candidate :meth:`scores`, pair by score); see
    `trl_selfplay.judges.preferences`.
    """

    mode: str = "pairwise"

    @abstractmethod
    def preference_matrix(self, prompts: list[str], completions: list[list[str]]) -> torch.Tensor:
        """Return a float tensor of shape [N, K, K] whose entry [n, i, j] is P(y_i ≻ y_j | x_n); diagonal ½."""

    def scores(self, prompts: list[str], completions: list[list[str]]) -> torch.Tensor:
        """Per-candidate scores s[n, k] (higher is better), shape [N, K], for judges that have them."""
        raise ValueError(
            f"{type(self).__name__} has no per-candidate scores, which mode='aggregate' needs; use mode='pairwise'."
        )

    def preferences(self, prompts: list[str], completions: list[list[str]]) -> list[dict[str, Any]]:
        """One record per prompt: `preferences` (K×K list), `win_probs`, `chosen_index`, `rejected_index` and
        `scores` (None in `"pairwise"` mode when the judge has no scores), by the rule of `self.mode`."""
        from trl_selfplay.judges.preferences import preference_record

        check_judge_inputs(prompts, completions)
        if self.mode == "aggregate":
            return [preference_record("aggregate", scores=row) for row in self.scores(prompts, completions)]
        return [
            preference_record("pairwise", preferences=matrix)
            for matrix in self.preference_matrix(prompts, completions)
        ]
