"""The state the runner's stages share: the run (`RunContext`) and one iteration of it (`Iteration`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from trl_selfplay.methods import MethodSpec, get_method
from trl_selfplay.recipes import Recipe, anchor_model, import_callable, iteration_dir, start_model
from trl_selfplay.runner.data import check_data, source_key
from trl_selfplay.runner.distributed import barrier, is_main, state
from trl_selfplay.runner.faults import pausing
from trl_selfplay.runner.io import read_json, read_jsonl, write_jsonl
from trl_selfplay.runner.manifest import OUTPUTS, Ledger, Stage


@dataclass
class RunContext:
    """One run of a validated recipe in `output_dir` (whose finished files are reused)."""

    recipe: Recipe
    hub_api: Any = None
    datasets: dict[str, Any] = field(default_factory=dict)  # loaded dataset per distinct `data` source

    def load_datasets(self) -> None:
        """Load and check every dataset the run reads (the run's and each iteration's `data` overrides, e.g. one
        prompt set per iteration), before any model is loaded."""
        for recipe in [self.recipe, *self.recipe.resolved.values()]:
            key = source_key(recipe)
            if key not in self.datasets:
                with state().main_process_first():  # one download of a Hub dataset, then read from the cache
                    self.datasets[key] = check_data(recipe)

    def dataset(self, recipe: Recipe):
        """The loaded dataset that `recipe`'s `data` section names."""
        return self.datasets[source_key(recipe)]

    @property
    def output_dir(self) -> Path:
        return Path(self.recipe.output_dir)

    @cached_property
    def ledger(self) -> Ledger:
        """The manifests of finished stages in `output_dir` (`trl_selfplay.runner.manifest`)."""
        return Ledger(self.output_dir, self.recipe)

    def stage(self, name: str, t: int | None = None) -> Stage:
        return self.ledger.stage(name, t)

    def log(self, message: str) -> None:
        if is_main():
            print(f"[trl-selfplay] {message}", flush=True)

    def model_kwargs(self, path: str) -> dict[str, Any]:
        """`from_pretrained` arguments for `path`; the recipe's revision pins the start model only."""
        from trl_selfplay.models import model_init_kwargs

        m = self.recipe.model
        revision = m.revision if path == m.name_or_path else None
        return model_init_kwargs(dtype=m.dtype, revision=revision, trust_remote_code=m.trust_remote_code)

    def load_tokenizer(self, path: str):
        from trl_selfplay.models import load_tokenizer

        kwargs = self.model_kwargs(path)
        return load_tokenizer(path, revision=kwargs.get("revision"), trust_remote_code=kwargs["trust_remote_code"])

    def judge(self, recipe: Recipe):
        """The recipe's judge, or None without a `judge` section."""
        j = recipe.judge
        if j is None:
            return None
        if j.type == "function":
            from trl_selfplay.judges import RewardFunctionJudge

            fn = import_callable(j.function, "judge.function")
            return RewardFunctionJudge(fn, kind=j.kind, temperature=j.temperature, **{"mode": j.mode, **j.kwargs})
        from trl_selfplay.judges import PairRMJudge

        return PairRMJudge(j.model_name_or_path, batch_size=j.batch_size, **{"mode": j.mode, **j.kwargs})


@dataclass
class Iteration:
    """Iteration t: its resolved recipe, method, directory and models, and the stages' results as they come."""

    run: RunContext
    t: int
    examples: list[dict[str, Any]] = field(default_factory=list)
    generations: list[dict[str, Any]] = field(default_factory=list)
    anchor_samples: list[str] | None = None
    preferences: list[dict[str, Any]] | None = None
    rows: list[dict[str, Any]] = field(default_factory=list)
    num_current_rows: int = 0
    num_tied_pairs: int = 0
    eval_metrics: dict[str, Any] | None = None
    config: Any = None  # the method's TRL config of this iteration (`stages.training_config`)

    def __post_init__(self) -> None:
        self.recipe: Recipe = self.run.recipe.for_iteration(self.t)
        self.spec: MethodSpec = get_method(self.recipe.method)
        self.dir: Path = iteration_dir(self.recipe.output_dir, self.t)
        self.policy: str = start_model(self.recipe, self.t)  # π_t, also this iteration's reference
        self.anchor: str = anchor_model(self.recipe)  # μ

    @property
    def num_iterations(self) -> int:
        return self.recipe.iterations.count

    def log(self, message: str) -> None:
        self.run.log(f"iteration {self.t}: {message}")

    def model_kwargs(self, path: str) -> dict[str, Any]:
        return self.run.model_kwargs(path)

    def read_reference(self, t: int) -> dict[str, Any]:
        return read_json(iteration_dir(self.recipe.output_dir, t) / "reference.json")

    def stage(self, name: str) -> Stage:
        return self.run.stage(name, self.t)

    def stage_jsonl(self, stage: str, compute: Callable[[], list[dict[str, Any]]]) -> list[dict[str, Any]]:
        """The one rule for finished outputs, for a stage whose output is one jsonl file (`OUTPUTS[stage]` of
        `trl_selfplay.runner.manifest`): when the stage's manifest says it is done (same inputs, file present) the
        file is read back; otherwise `compute()` runs on every process, the main process writes the file
        atomically, then the manifest (its row count and hash). A file without a manifest is an
        unfinished stage's and is computed again. The kill-and-resume test hook (`trl_selfplay.runner.faults`)
        can stop the write half-way, under the stage's name.
        """
        handle = self.stage(stage)
        (name,) = OUTPUTS[stage]
        path = self.dir / name
        if handle.done():
            self.log(f"{stage} done, skipping")
            return read_jsonl(path)
        rows = compute()
        if is_main():
            write_jsonl(path, pausing(rows, self.run.output_dir, stage, self.t))
            handle.commit()
        barrier()
        return rows
