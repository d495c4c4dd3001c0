"""The one training sequence every stage uses (SFT warm start, continued SFT, self-play): build the trainer on a
file-backed dataset, run the reference hook, train (resuming from the last checkpoint of this stage if the recipe
saves some), save the model atomically, write `train_metrics.json`, and only then mark the stage done (its
manifest), so a crash anywhere before leaves a stage that a rerun trains again."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trl_selfplay.runner.distributed import barrier, free_memory, is_main
from trl_selfplay.runner.faults import pause
from trl_selfplay.runner.io import write_json
from trl_selfplay.runner.manifest import Stage


def shared_dataset(rows: list[dict[str, Any]], path: Path):
    """A file-backed dataset: TRL caches the precomputed log-probs next to the dataset's files, which every
    process must see (an in-memory dataset caches in a per-process temporary directory)."""
    from datasets import Dataset, load_from_disk

    if is_main():
        shutil.rmtree(path, ignore_errors=True)
        Dataset.from_list(rows).save_to_disk(str(path))
    barrier()
    return load_from_disk(str(path))


def save_model(trainer, tokenizer, final_dir: Path) -> None:
    """Save through the trainer (ZeRO-3 gathers the shards on every process) to a temp dir, then rename."""
    tmp = final_dir.with_name(final_dir.name + ".tmp")
    if is_main():
        shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    trainer.save_model(str(tmp))
    if is_main():
        tokenizer.save_pretrained(str(tmp))
        shutil.rmtree(final_dir, ignore_errors=True)  # an unfinished stage's model (a crash before its manifest)
        os.replace(tmp, final_dir)
    barrier()


def train_and_save(
    run,
    trainer_cls: type,
    model_path: str,
    config,
    rows: list[dict[str, Any]],
    final_dir: Path,
    stage: Stage,
    *,
    callbacks: list[Any] | None = None,
    before_train: Callable[[Any], Any] | None = None,
) -> None:
    """Train `trainer_cls` from `model_path` on `rows` into `final_dir` (its parent holds `trainer/` and
    `train_metrics.json`), then commit `stage`. `before_train(trainer)` runs after the trainer is built (so after
    TRL's reference precompute pass) and before the first step."""
    from transformers.trainer_utils import get_last_checkpoint

    stage_dir = final_dir.parent
    if is_main():
        stage_dir.mkdir(parents=True, exist_ok=True)
        if final_dir.exists():
            run.log(f"{final_dir} is left from an interrupted run (its stage never finished): training again")
        stage.start()  # checkpoints saved from here on are resumed only with these inputs
    barrier()
    trainer_dir = Path(config.output_dir)
    tokenizer = run.load_tokenizer(model_path)
    trainer = trainer_cls(
        model=model_path, args=config, train_dataset=shared_dataset(rows, trainer_dir / "dataset"),
        processing_class=tokenizer, callbacks=callbacks,
    )  # fmt: skip
    if before_train is not None:
        before_train(trainer)
    # A run killed during training resumes from the trainer's last checkpoint of this stage when the recipe saves
    # some (`training.save_strategy`), otherwise it trains the stage again from its start model.
    checkpoint = get_last_checkpoint(str(trainer_dir)) if trainer_dir.is_dir() else None
    if checkpoint is not None:
        run.log(f"resuming training from {checkpoint}")
    result = trainer.train(resume_from_checkpoint=checkpoint)
    save_model(trainer, tokenizer, final_dir)
    if stage.t is not None:
        pause(run.output_dir, "model_saved", stage.t)  # test hook: a crash between the model and its metrics
    if is_main():
        write_json(
            stage_dir / "train_metrics.json", {"log_history": trainer.state.log_history, "train": result.metrics}
        )
        stage.commit()
    barrier()
    del trainer
    free_memory()
