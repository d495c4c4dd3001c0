"""Integer addition: a tiny, bundled, offline task on which self-play can be measured without a judge model.

Why addition: exact-match correctness is a metric anyone reads at a glance, a programmatic judge can rank any two
answers (correct first, then closer), the data is generated deterministically from a seed (nothing to download),
and a ~0.7M-parameter model trained from scratch on 2 CPU cores for about a minute (500 steps, the demo's warm
start) is imperfect but far from random, which leaves self-play room to help or hurt. The default is 2-digit
operands: 3-digit sums (answer written most-significant digit first) stayed below 2% accuracy after 900 steps here.

Format (plain text, no chat template, one character per token): prompt ``"47+85="``, completion ``"132"``.
"""

from __future__ import annotations

import math
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "ArithmeticTask",
    "addition_dataset",
    "addition_reward",
    "addition_score",
    "exact_match",
    "make_arithmetic_model",
    "parse_addition",
]

_PROMPT_RE = re.compile(r"^\s*(\d+)\s*\+\s*(\d+)\s*=\s*$")
_ANSWER_RE = re.compile(r"^\s*(\d+)")


def parse_addition(prompt: str) -> int:
    """The true sum of an addition prompt such as ``"12+34="``."""
    match = _PROMPT_RE.match(prompt)
    if match is None:
        raise ValueError(f"Not an addition prompt of the form 'a+b=': {prompt!r}.")
    return int(match.group(1)) + int(match.group(2))


def _parse_answer(completion: str) -> int | None:
    match = _ANSWER_RE.match(completion)
    return int(match.group(1)) if match else None


def _normalise(completion: str) -> str:
    return completion.strip()


def exact_match(completions: list[str], answers: list[str]) -> float:
    """Fraction of completions equal to their answer after stripping surrounding whitespace (0.0 for no pairs)."""
    if len(completions) != len(answers):
        raise ValueError(f"`completions` ({len(completions)}) and `answers` ({len(answers)}) differ in length.")
    if not completions:
        return 0.0
    return sum(_normalise(c) == _normalise(a) for c, a in zip(completions, answers)) / len(completions)


def addition_score(prompt: str, completion: str) -> float:
    """Programmatic judge for addition: correctness first, then closeness.

    1.0 for the exact sum; an integer answer that is wrong scores in (0, 0.5], higher when closer to the sum
    (``0.5 / (1 + log10(1 + |error|))``); anything that does not start with a digit scores 0. Every correct answer
    therefore beats every wrong one, and among wrong answers the closer wins. The sum is read from the prompt, so
    the judge needs no answer key. Usable as ``RewardFunctionJudge(addition_score, kind="reward")`` or, in a recipe,
    ``judge: {type: function, function: trl_selfplay.tasks.arithmetic:addition_score}``.
    """
    target = parse_addition(prompt)
    text = _normalise(completion)
    if text == str(target):
        return 1.0
    value = _parse_answer(text)
    if value is None:
        return 0.0
    return 0.5 / (1.0 + math.log10(1.0 + abs(value - target)))


def addition_reward(prompts: list[str], completions: list[str]) -> list[float]:
    """`addition_score` over lists (one completion per prompt)."""
    if len(prompts) != len(completions):
        raise ValueError(f"`prompts` ({len(prompts)}) and `completions` ({len(completions)}) differ in length.")
    return [addition_score(p, c) for p, c in zip(prompts, completions)]


@dataclass
class ArithmeticTask:
    """Deterministic addition data: annotated training pairs and disjoint held-out evaluation prompts.

    Args:
        num_digits: operands are drawn uniformly from ``[0, 10**num_digits)``.
        num_train: number of annotated ``{"prompt", "completion"}`` training pairs; `None`: every pair not held out.
        num_eval: number of held-out ``{"prompt", "answer"}`` evaluation prompts, never seen in training.
        seed: seed of the draw; the same arguments always give the same data.
    """

    num_digits: int = 2
    num_train: int | None = None
    num_eval: int = 200
    seed: int = 0

    def __post_init__(self):
        if self.num_digits < 1:
            raise ValueError(f"`num_digits` must be >= 1, got {self.num_digits}.")
        available = (10**self.num_digits) ** 2
        if self.num_train is None:
            self.num_train = max(available - self.num_eval, 0)
        if self.num_train < 0 or self.num_eval < 0:
            raise ValueError(f"`num_train` and `num_eval` must be >= 0, got {self.num_train}, {self.num_eval}.")
        if self.num_train + self.num_eval > available:
            raise ValueError(
                f"`num_train` + `num_eval` = {self.num_train + self.num_eval} exceeds the {available} distinct "
                f"{self.num_digits}-digit additions; lower them or raise `num_digits`."
            )
        self._train: list[tuple[int, int]] | None = None
        self._eval: list[tuple[int, int]] | None = None

    def _draw(self) -> None:
        if self._train is not None:
            return
        rng = random.Random(self.seed)
        high = 10**self.num_digits
        # Evaluation pairs are drawn first so they do not change when `num_train` changes.
        seen: set[tuple[int, int]] = set()
        pairs: list[tuple[int, int]] = []
        while len(pairs) < self.num_eval + self.num_train:
            pair = (rng.randrange(high), rng.randrange(high))
            if pair not in seen:
                seen.add(pair)
                pairs.append(pair)
        self._eval, self._train = pairs[: self.num_eval], pairs[self.num_eval :]

    @staticmethod
    def format_prompt(a: int, b: int) -> str:
        return f"{a}+{b}="

    def train_pairs(self) -> list[dict[str, str]]:
        """Annotated training data in TRL's prompt-completion format."""
        self._draw()
        return [{"prompt": self.format_prompt(a, b), "completion": str(a + b)} for a, b in self._train]

    def eval_examples(self) -> list[dict[str, str]]:
        """Held-out prompts with their answers (disjoint from `train_pairs`)."""
        self._draw()
        return [{"prompt": self.format_prompt(a, b), "answer": str(a + b)} for a, b in self._eval]

    def eval_prompts(self) -> list[str]:
        return [example["prompt"] for example in self.eval_examples()]

    # What `trl_selfplay.evaluation.evaluate_iteration` reads from a task.
    metric_name = "accuracy"
    bleu_tokenize = "char"  # answers are one "word": compare their digits

    @property
    def max_new_tokens(self) -> int:
        return self.num_digits + 3  # the sum's digits, the end-of-sequence token and room for one mistake

    def metric(self, prompts: list[str], completions: list[str]) -> float:
        """Exact-match accuracy of one completion per prompt."""
        return exact_match(completions, [str(parse_addition(p)) for p in prompts])

    def judge(self):
        """`RewardFunctionJudge` over `addition_score`."""
        from trl_selfplay.judges import RewardFunctionJudge

        return RewardFunctionJudge(addition_score, kind="reward")


def addition_dataset(
    split: str = "train", num_digits: int = 2, num_train: int | None = None, num_eval: int = 200, seed: int = 0
):
    """The addition data as a `datasets.Dataset` (recipe: `data.dataset_fn: trl_selfplay.tasks.arithmetic:addition_dataset`).

    `split="train"`: columns `prompt`, `completion` (annotated sums); `split="eval"`: `prompt`, `answer` (held out).
    """
    from datasets import Dataset

    task = ArithmeticTask(num_digits=num_digits, num_train=num_train, num_eval=num_eval, seed=seed)
    if split == "train":
        return Dataset.from_list(task.train_pairs())
    if split in ("eval", "test"):
        return Dataset.from_list(task.eval_examples())
    raise ValueError(f"`split` must be 'train' or 'eval', got {split!r}.")


def make_arithmetic_model(
    path: str | os.PathLike,
    *,
    hidden_size: int = 128,
    num_hidden_layers: int = 4,
    num_attention_heads: int = 4,
    intermediate_size: int | None = None,
    architecture: str = "qwen2",
    seed: int = 0,
) -> Path:
    """A tiny random causal LM with a character-level tokenizer, for addition.

    Byte-level BPE trained with no room for merges (256 byte symbols + 4 special tokens) is a character-level
    tokenizer: every digit is its own token, which a model this small needs to learn carrying. Same chat-template
    and special tokens as `trl_selfplay.testing.make_tiny_causal_lm`, so everything else in the package applies.
    """
    from trl_selfplay.testing import SPECIAL_TOKENS, make_tiny_causal_lm

    return make_tiny_causal_lm(
        path,
        vocab_corpus=["0123456789+="],
        vocab_size=256 + len(SPECIAL_TOKENS),
        architecture=architecture,
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=64,
        seed=seed,
    )
