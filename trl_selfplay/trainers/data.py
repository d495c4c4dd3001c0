"""The data side of the self-play trainers: the collator with the originals' truncation swapped in before TRL's
reference pass, rows TRL would drop counted and logged (never dropped silently), and the lengths the trainer scores.
"""

from __future__ import annotations

import copy

import numpy as np
from accelerate.logging import get_logger
from datasets import Dataset
from trl.trainer.dpo_trainer import DataCollatorForPreference

logger = get_logger(__name__)


class SelfPlayDataMixin:
    """Dataset preparation of `SelfPlayTrainerBase` (mixed in)."""

    def _use_selfplay_collator(self) -> None:
        """Replace TRL's default collator by `collator_class` with the same settings plus `max_prompt_length`.
        Runs before the first collation (TRL's reference precompute happens inside `DPOTrainer.__init__`)."""
        if type(self.data_collator) is DataCollatorForPreference:
            base = self.data_collator
            self.data_collator = self.collator_class(
                pad_token_id=base.pad_token_id,
                max_length=base.max_length,
                truncation_mode=base.truncation_mode,
                pad_to_multiple_of=base.pad_to_multiple_of,
                max_prompt_length=self.args.max_prompt_length,
            )

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        # TRL drops the rows whose prompt alone fills `max_length` (with `keep_start`) without a word: prepare
        # without that filter, then drop the same rows here, logged and recorded. With `max_prompt_length` the
        # prompt is cut instead, so no row is dropped.
        unfiltered = copy.copy(args)
        unfiltered.max_length = None
        dataset = super()._prepare_dataset(dataset, processing_class, unfiltered, dataset_name)
        if args.max_length is None or args.truncation_mode != "keep_start" or args.max_prompt_length is not None:
            self.dropped_rows[dataset_name] = []
            return dataset
        return self._drop_prompts_filling_max_length(dataset, args.max_length, dataset_name)

    def _drop_prompts_filling_max_length(self, dataset, max_length: int, name: str):
        hint = "set `max_prompt_length` (e.g. max_length // 2) to cut long prompts instead, or raise `max_length`"
        if isinstance(dataset, Dataset):
            import pyarrow.compute as pc

            lengths = pc.list_value_length(dataset.with_format("arrow")["prompt_ids"]).to_numpy(zero_copy_only=False)
            dropped = np.flatnonzero(lengths >= max_length)
            self.dropped_rows[name] = dropped.tolist()
            if dropped.size == 0:
                return dataset
            logger.warning(
                f"Dropped {dropped.size} of {len(dataset)} rows of the {name} dataset whose prompt alone has >= "
                f"max_length={max_length} tokens (rows {dropped[:10].tolist()}{'…' if dropped.size > 10 else ''}; "
                f"all in `trainer.dropped_rows[{name!r}]`): {hint}."
            )
            return dataset.select(np.flatnonzero(lengths < max_length))
        # An IterableDataset is filtered as it streams: rows are recorded (and logged) when first reached.
        dropped_list = self.dropped_rows.setdefault(name, [])

        def keep(example, index):
            if len(example["prompt_ids"]) < max_length:
                return True
            if index in dropped_list:  # a later epoch
                return False
            dropped_list.append(index)
            logger.warning(
                f"Dropped row {index} of the {name} dataset: its prompt alone has >= max_length={max_length} tokens "
                f"({len(dropped_list)} dropped so far): {hint}."
            )
            return False

        return dataset.filter(keep, with_indices=True)

    @property
    def num_dropped_rows(self) -> int:
        """How many rows of all datasets were dropped because their prompt alone fills `max_length` (see
        `dropped_rows` for which)."""
        return sum(len(rows) for rows in self.dropped_rows.values())

    def completion_lengths(self, dataset=None, batch_size: int = 64) -> tuple[list[int], list[int]]:
        """The number of chosen / rejected completion tokens the trainer scores per row of `dataset` (a dataset
        prepared by this trainer; default `train_dataset`), AFTER the collator's truncation: the lengths that match
        the summed log-probs (e.g. for IRIS's per-token gap, `trl_selfplay.losses.distribution_gap`)."""
        from torch.utils.data import DataLoader

        dataset = self.train_dataset if dataset is None else dataset
        chosen: list[int] = []
        rejected: list[int] = []
        for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=self.data_collator, shuffle=False):
            chosen_part, rejected_part = batch["completion_mask"].sum(dim=1).chunk(2, dim=0)
            chosen.extend(chosen_part.tolist())
            rejected.extend(rejected_part.tolist())
        return chosen, rejected
