"""A judge from any Python callable: a reward function or a pairwise preference function."""

from __future__ import annotations

from collections.abc import Callable

import torch

from trl_selfplay.judges.base import PreferenceJudge, check_judge_inputs
from trl_selfplay.judges.preferences import PREFERENCE_MODES

KINDS = ("reward", "pairwise")


class RewardFunctionJudge(PreferenceJudge):
    """Preference matrix from a Python callable, so self-play can run without PairRM (e.g. a programmatic checker).

    Args:
        fn: with `kind="reward"`, `fn(prompt, completion) -> float` (higher is better); with `kind="pairwise"`,
            `fn(prompt, a, b) -> float`, the probability that `a` is preferred to `b`, in [0, 1].
        kind: `"reward"` (Bradley-Terry: P_ij = σ((s_i − s_j) / temperature)) or `"pairwise"` (P_ij = fn(x, y_i, y_j)).
        temperature: scale of reward differences (`kind="reward"` only).
        mode: how :meth:`preferences` picks the pair: `"pairwise"` (win rates of the matrix) or `"aggregate"`
            (SPPO's rule on the scores :meth:`scores` = reward / temperature; `kind="reward"` only).

    Example:
        >>> judge = RewardFunctionJudge(lambda prompt, completion: float(completion.strip() == "4"))
        >>> judge.preference_matrix(["2+2="], [["4", "5"]])[0, 0, 1]  # σ(1) ≈ 0.73
    """

    def __init__(
        self, fn: Callable[..., float], *, kind: str = "reward", temperature: float = 1.0, mode: str = "pairwise"
    ):
        if not callable(fn):
            raise ValueError(f"`fn` must be callable, got {type(fn).__name__}.")
        if kind not in KINDS:
            raise ValueError(f"`kind` must be one of {KINDS}, got {kind!r}.")
        if not temperature > 0:
            raise ValueError(f"`temperature` must be > 0, got {temperature!r}.")
        if kind == "pairwise" and temperature != 1.0:
            raise ValueError("`temperature` scales reward differences; it has no meaning with `kind='pairwise'`.")
        if mode not in PREFERENCE_MODES:
            raise ValueError(f"`mode` must be one of {PREFERENCE_MODES}, got {mode!r}.")
        if mode == "aggregate" and kind != "reward":
            raise ValueError(
                "`mode='aggregate'` ranks by per-candidate scores, which only `kind='reward'` has; use "
                "mode='pairwise' with a pairwise function."
            )
        self.mode = mode
        self.fn = fn
        self.kind = kind
        self.temperature = temperature

    def rewards(self, prompts: list[str], completions: list[list[str]]) -> torch.Tensor:
        """Scores s[n, k] = fn(prompt_n, completion_nk) (`kind="reward"`)."""
        if self.kind != "reward":
            raise ValueError("`rewards` needs `kind='reward'`.")
        check_judge_inputs(prompts, completions)
        return torch.tensor(
            [[float(self.fn(p, c)) for c in cands] for p, cands in zip(prompts, completions)], dtype=torch.float64
        )

    def scores(self, prompts: list[str], completions: list[list[str]]) -> torch.Tensor:
        """Bradley-Terry scores s[n, k] = reward / temperature, so that P_ij = σ(s_i − s_j) (`kind="reward"`)."""
        if self.kind != "reward":
            raise ValueError("A pairwise judge has no per-candidate scores; `scores` needs `kind='reward'`.")
        return self.rewards(prompts, completions) / self.temperature

    def preference_matrix(self, prompts: list[str], completions: list[list[str]]) -> torch.Tensor:
        k = check_judge_inputs(prompts, completions)
        if self.kind == "reward":
            scores = self.rewards(prompts, completions)
            diff = (scores[:, :, None] - scores[:, None, :]) / self.temperature
            return torch.sigmoid(diff).float()  # diagonal: σ(0) = ½ exactly
        probs = torch.full((len(prompts), k, k), 0.5, dtype=torch.float64)
        for n, (prompt, cands) in enumerate(zip(prompts, completions)):
            for i in range(k):
                for j in range(k):
                    if i == j:
                        continue
                    value = float(self.fn(prompt, cands[i], cands[j]))
                    if not 0.0 <= value <= 1.0:
                        raise ValueError(
                            f"A pairwise `fn` must return a probability in [0, 1], got {value} for prompt {n}, "
                            f"pair ({i}, {j})."
                        )
                    probs[n, i, j] = value
        return probs.float()
