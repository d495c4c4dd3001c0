"""Text metrics of an evaluation: sentence BLEU, self-BLEU (diversity) and the win rate under a pairwise judge."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

__all__ = ["bleu", "self_bleu", "win_rate"]


def _tokenize(text: str, tokenize: str) -> list[str]:
    if tokenize == "whitespace":
        return text.split()
    if tokenize == "char":
        return [c for c in text if not c.isspace()]
    raise ValueError(f"`tokenize` must be 'whitespace' or 'char', got {tokenize!r}.")


def _ngrams(tokens: Sequence[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def bleu(
    hypothesis: str,
    references: Sequence[str],
    *,
    max_order: int = 4,
    tokenize: str = "whitespace",
    smoothing_epsilon: float = 0.1,
) -> float:
    """Sentence BLEU (Papineni et al. 2002) of one hypothesis against one or more references.

    Modified n-gram precisions p_n (hypothesis counts clipped by the largest count in any single reference),
    geometric mean with uniform weights over n = 1..max_order, brevity penalty against the reference length
    closest to the hypothesis length (ties: the shorter). An order with no matching n-gram gets
    `smoothing_epsilon / total` (Chen & Cherry 2014, method 1) so one missing order does not zero the score; an order
    the hypothesis is too short to contain is left out of the mean. Returns a value in [0, 1].
    """
    if max_order < 1:
        raise ValueError(f"`max_order` must be >= 1, got {max_order}.")
    if not references:
        raise ValueError("`references` must contain at least one string.")
    hyp = _tokenize(hypothesis, tokenize)
    refs = [_tokenize(r, tokenize) for r in references]
    if not hyp:
        return 0.0
    log_precisions = []
    for n in range(1, max_order + 1):
        hyp_counts = _ngrams(hyp, n)
        total = sum(hyp_counts.values())
        if total == 0:
            break  # hypothesis shorter than n: higher orders are undefined, not zero
        max_ref: Counter = Counter()
        for ref in refs:
            for gram, count in _ngrams(ref, n).items():
                max_ref[gram] = max(max_ref[gram], count)
        matches = sum(min(count, max_ref[gram]) for gram, count in hyp_counts.items())
        precision = matches / total if matches > 0 else smoothing_epsilon / total
        log_precisions.append(math.log(precision))
    ref_len = min((len(r) for r in refs), key=lambda length: (abs(length - len(hyp)), length))
    brevity = 1.0 if len(hyp) > ref_len else math.exp(1 - ref_len / len(hyp))
    return brevity * math.exp(sum(log_precisions) / len(log_precisions))


def self_bleu(
    samples: Sequence[Sequence[str]],
    *,
    max_order: int = 4,
    tokenize: str = "whitespace",
    smoothing_epsilon: float = 0.1,
) -> float:
    """Self-BLEU (Zhu et al. 2018), the diversity measure of the RSPO paper's Table 3: lower is more diverse.

    For each prompt's samples, the BLEU of every sample against the other samples of the same prompt as
    references, averaged over samples and then over prompts. Prompts with fewer than two samples are skipped;
    `nan` when no prompt has two.
    """
    scores = []
    for group in samples:
        if len(group) < 2:
            continue
        per_sample = [
            bleu(
                group[i],
                [group[j] for j in range(len(group)) if j != i],
                max_order=max_order,
                tokenize=tokenize,
                smoothing_epsilon=smoothing_epsilon,
            )
            for i in range(len(group))
        ]
        scores.append(sum(per_sample) / len(per_sample))
    return sum(scores) / len(scores) if scores else float("nan")


def win_rate(judge: Any, prompts: Sequence[str], current: Sequence[str], previous: Sequence[str]) -> dict[str, float]:
    """Win rate of `current` against `previous` (one completion each per prompt) under a pairwise judge.

    `judge.preference_matrix(prompts, [[current_n, previous_n], ...])[n, 0, 1]` is P(current ≻ previous | x_n).

    Returns:
        `win_rate`: fraction of prompts where the judge prefers the current completion (P > ½), ties (P = ½, e.g.
        identical answers) counting half — the discrete rate AlpacaEval-style tables report;
        `win_prob`: mean of P, the judge's expected preference;
        `tie_rate`: fraction of exact ties.
    """
    if not (len(prompts) == len(current) == len(previous)):
        raise ValueError(
            f"`prompts` ({len(prompts)}), `current` ({len(current)}) and `previous` ({len(previous)}) must have the "
            "same length: one completion of each model per prompt."
        )
    if not prompts:
        return {"win_rate": float("nan"), "win_prob": float("nan"), "tie_rate": float("nan")}
    matrix = judge.preference_matrix(list(prompts), [[c, p] for c, p in zip(current, previous)])
    probs = [float(matrix[n][0][1]) for n in range(len(prompts))]
    ties = [abs(p - 0.5) < 1e-9 for p in probs]
    wins = [0.5 if tie else float(p > 0.5) for p, tie in zip(probs, ties)]
    return {
        "win_rate": sum(wins) / len(wins),
        "win_prob": sum(probs) / len(probs),
        "tie_rate": sum(ties) / len(ties),
    }
