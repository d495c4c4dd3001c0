"""From a judge's output on the K samples of one prompt to what RSPO/SPPO train on: the K×K preference matrix, the
estimated win probabilities P(y_i ≻ π_t) and the chosen / rejected pair.

Two rules, chosen by a judge's `mode` (see `docs/fidelity.md`):

- `"aggregate"`, the SPPO/RSPO pipeline (:func:`sppo_preferences`): one score per sample, the matrix from score
  differences, the pair = argmax / argmin of the scores.
- `"pairwise"`, ours (:func:`pairwise_preferences`): a judged K×K matrix, the pair = argmax / argmin of the win rates.
"""

from __future__ import annotations

from typing import Any

import torch

from trl_selfplay.losses import win_probabilities

PREFERENCE_MODES = ("pairwise", "aggregate")


def _first_extreme(values: torch.Tensor, largest: bool) -> int:
    """Index of the first maximum (minimum) — numpy's `argmax` / `argmin` tie-breaking, spelled out rather than
    relying on torch's."""
    target = values.max() if largest else values.min()
    return int(torch.nonzero(values == target)[0, 0])


def sppo_preferences(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    r"""SPPO's preferences from K per-candidate scores s (uclaml/SPPO `scripts/compute_prob.py`, `from_ranks` and
    `prepare_score`; RSPO reuses the script unchanged).

    .. math:: P_{ij} = \frac{1}{1 + e^{s_j - s_i}}, \qquad
              \hat P(y_i \succ \pi_t) = \frac{1}{K}\sum_j P_{ij} \text{ (diagonal ½ included)},

    chosen = argmax s, rejected = argmin s, the FIRST index on ties (the original's `np.argmax` / `np.argmin`), so K
    identical scores give chosen = rejected = 0.

    Args:
        scores: shape [K], e.g. PairRM's aggregated scores (llm-blender `rank(..., return_scores=True)`).

    Returns:
        `(P, win_probs, chosen, rejected)`: P of shape [K, K] and win_probs of shape [K], in float64.
    """
    scores = torch.as_tensor(scores)
    if scores.dim() != 1 or scores.numel() == 0:
        raise ValueError(f"`scores` must be a 1-D tensor of K >= 1 candidate scores, got shape {tuple(scores.shape)}.")
    scores = scores.double()
    if not torch.isfinite(scores).all():
        raise ValueError(f"`scores` must be finite, got {scores.tolist()}.")
    preferences = torch.sigmoid(scores[:, None] - scores[None, :])  # 1 / (1 + exp(s_j - s_i))
    win_probs = preferences.sum(dim=1) / scores.numel()
    return preferences, win_probs, _first_extreme(scores, True), _first_extreme(scores, False)


def pairwise_preferences(preferences: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    r"""Win probabilities and the pair from a judged K×K matrix `preferences[i, j]` = P(y_i ≻ y_j):
    :math:`\hat P(y_i \succ \pi_t)` = row mean (:func:`trl_selfplay.losses.win_probabilities`, diagonal included),
    chosen = argmax and rejected = argmin of the win probabilities (first index on ties).

    Returns:
        `(win_probs, chosen, rejected)`, win_probs of shape [K] in float64.
    """
    preferences = torch.as_tensor(preferences).double()
    if preferences.dim() != 2:
        raise ValueError(f"`preferences` must have shape [K, K], got {tuple(preferences.shape)}.")
    win_probs = win_probabilities(preferences)
    return win_probs, _first_extreme(win_probs, True), _first_extreme(win_probs, False)


def preference_record(
    mode: str, *, scores: torch.Tensor | None = None, preferences: torch.Tensor | None = None
) -> dict[str, Any]:
    """One prompt's record, as the runner stores it in `preferences.jsonl`: `preferences` (K×K list), `win_probs`,
    `chosen_index`, `rejected_index` and `scores` (list, or None when the judge has no per-candidate scores).

    `mode="aggregate"` needs `scores` (:func:`sppo_preferences`); `mode="pairwise"` needs `preferences`
    (:func:`pairwise_preferences`) and passes `scores` through when given.
    """
    if mode == "aggregate":
        if scores is None:
            raise ValueError("`mode='aggregate'` derives the preferences from per-candidate scores; pass `scores`.")
        matrix, win_probs, chosen, rejected = sppo_preferences(scores)
    elif mode == "pairwise":
        if preferences is None:
            raise ValueError("`mode='pairwise'` reads a judged preference matrix; pass `preferences`.")
        matrix = torch.as_tensor(preferences).double()
        win_probs, chosen, rejected = pairwise_preferences(matrix)
    else:
        raise ValueError(f"`mode` must be one of {PREFERENCE_MODES}, got {mode!r}.")
    return {
        "preferences": matrix.tolist(),
        "win_probs": win_probs.tolist(),
        "chosen_index": chosen,
        "rejected_index": rejected,
        "scores": None if scores is None else torch.as_tensor(scores).double().tolist(),
    }
