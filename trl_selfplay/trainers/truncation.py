"""The originals' truncation policy for over-long pairs, as an opt-in on top of TRL's collator.

TRL 1.16 (`DataCollatorForPreference`) cuts each prompt + completion sequence to `max_length` (with the default
`keep_start`, from its end), and `DPOTrainer._prepare_dataset` drops rows whose prompt alone fills `max_length`.
The originals (uclaml/SPIN `spin/alignment/utils.py::DataCollatorWithPadding.tokenize_batch_element`, uclaml/SPPO
and xiaohangt/RSPO `sppo/trainer.py::SPPOTrainer.tokenize_row`, all from TRL's pre-1.0 DPO collator) cut the
PROMPT first and keep both responses whole when they can; `SelfPlayConfig.max_prompt_length` selects that policy.
See `docs/fidelity.md`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from trl.trainer.dpo_trainer import DataCollatorForPreference


def truncate_prompt_and_responses(
    prompt_ids: Sequence[int],
    responses: Sequence[Sequence[int]],
    *,
    max_length: int,
    max_prompt_length: int,
) -> tuple[list[int], list[list[int]]]:
    """The originals' rule for one row (its responses share the prompt), with L = the longest response:

    1. if len(prompt) + L > max_length, the prompt keeps its LAST `max_prompt_length` tokens (the originals' default
       `truncation_mode="keep_end"`, which none of the papers' scripts change; a leading BOS is cut with the rest,
       as there);
    2. if len(prompt) + L is still > max_length, EVERY response keeps its first `max_length - max_prompt_length`
       tokens (whatever the prompt's actual length).

    The result never exceeds `max_length` tokens per sequence, and no row loses all of its prompt or responses.
    """
    if not 0 < max_prompt_length < max_length:
        raise ValueError(f"Need 0 < max_prompt_length < max_length, got {max_prompt_length} and {max_length}.")
    prompt = list(prompt_ids)
    longest = max((len(r) for r in responses), default=0)
    if len(prompt) + longest > max_length:
        prompt = prompt[-max_prompt_length:]
    budget = max_length - max_prompt_length
    if len(prompt) + longest > max_length:
        return prompt, [list(r[:budget]) for r in responses]
    return prompt, [list(r) for r in responses]


@dataclass
class DataCollatorForSelfPlay(DataCollatorForPreference):
    """TRL's preference collator, plus the originals' prompt-first truncation when `max_prompt_length` is set (see
    :func:`truncate_prompt_and_responses`; each example's `chosen_ids` and `rejected_ids` share one prompt cut).
    With `max_prompt_length=None` it is exactly TRL's collator. The examples passed in are not modified."""

    max_prompt_length: int | None = None

    def truncate_example(self, example: dict[str, Any]) -> dict[str, Any]:
        """A shallow copy of `example` with `prompt_ids`, `chosen_ids` and `rejected_ids` truncated."""
        if self.max_prompt_length is None:
            return example
        prompt, (chosen, rejected) = truncate_prompt_and_responses(
            example["prompt_ids"],
            [example["chosen_ids"], example["rejected_ids"]],
            max_length=self.max_length,
            max_prompt_length=self.max_prompt_length,
        )
        return {**example, "prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected}

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        if self.max_prompt_length is not None:
            if self.max_length is None:
                raise ValueError("`max_prompt_length` needs `max_length`: the rule cuts the prompt to fit it.")
            examples = [self.truncate_example(example) for example in examples]
        return super().torch_call(examples)
