"""The run's ledger of finished stages: a stage is done when its manifest exists, and only then.

When a stage finishes, the main process writes `manifest/<stage>.json` (in `<output_dir>/` for the run's stages,
in `iter_<t>/` for an iteration's) AFTER all of the stage's outputs, recording

- the stage's inputs (`trl_selfplay.runner.fingerprint`) and their fingerprint, and
- for every output file: its size, its sha256 (files up to `HASH_LIMIT` bytes) and, for `.jsonl`, its row count.

An output without a manifest is an unfinished stage's and is computed again. Before a rerun does any work,
`Ledger.verify` checks every manifest: inputs that differ from the recipe's (naming the field) or an output that is
missing, truncated or altered stop the run with one error that gives the two ways out: another `--output_dir`, or
`--restart-from <stage>[@<t>]`, which moves that stage's outputs and every later one to
`<output_dir>/discarded/<time>/` (`Ledger.restart_from`) so they are computed again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trl_selfplay.errors import RecipeError
from trl_selfplay.recipes import Recipe
from trl_selfplay.runner.fingerprint import (
    ITERATION_STAGES,
    RUN_STAGES,
    StageInputs,
    changed_fields,
    fingerprint,
)
from trl_selfplay.runner.io import write_json

MANIFEST_DIR = "manifest"
DISCARDED_DIR = "discarded"
# Files above this size are checked by size only (hashing a multi-GB weight shard on every resume costs minutes).
HASH_LIMIT = 1 << 30
# A stage's outputs, relative to its directory (`<output_dir>/` or `iter_<t>/`). `WORK` paths are not outputs (not
# recorded) but belong to the stage: `--restart-from` moves them with it (stale checkpoints, a half-saved model).
OUTPUTS: dict[str, tuple[str, ...]] = {
    "sft": ("sft/model", "sft/train_metrics.json"),
    "initial_eval": ("initial_eval.json",),
    "generate": ("generations.jsonl",),
    "anchor_generations": ("anchor_generations.jsonl",),
    "judge": ("preferences.jsonl",),
    "pairs": ("train.jsonl",),
    "train": ("reference.json", "model", "train_metrics.json"),
    "evaluate": ("eval.json",),
    "summary": ("model/README.md", "metrics.json"),
}
WORK: dict[str, tuple[str, ...]] = {
    "sft": ("sft/trainer", "sft/model.tmp"),
    "train": ("trainer", "model.tmp"),
    "summary": ("push.json",),
}
# Run-level files rebuilt from the stages' outputs on every run.
DERIVED = ("metrics.jsonl", "metrics.png")


def stage_label(stage: str, t: int | None) -> str:
    return f"stage `{stage}`" if t is None else f"stage `{stage}` of iteration {t}"


def restart_flag(stage: str, t: int | None) -> str:
    return f"--restart-from={stage}" if t is None else f"--restart-from={stage}@{t}"


def parse_restart(value: str, recipe: Recipe) -> tuple[str, int | None]:
    """`"train@1"` → ("train", 1); `"sft"` → ("sft", None); anything else is one clear error."""
    stage, _, index = value.partition("@")
    if stage in RUN_STAGES and not index:
        return stage, None
    valid = f"one of {list(RUN_STAGES)} or <stage>@<t> with <stage> in {list(ITERATION_STAGES)}"
    if stage not in ITERATION_STAGES or not index.isdigit():
        raise RecipeError(f"--restart-from={value}: expected {valid}, e.g. --restart-from=train@0.")
    t = int(index)
    if t >= recipe.iterations.count:
        raise RecipeError(f"--restart-from={value}: iteration {t} is outside 0..{recipe.iterations.count - 1}.")
    return stage, t


def _file_entry(path: Path) -> dict[str, Any]:
    size = path.stat().st_size
    entry: dict[str, Any] = {"bytes": size}
    if size <= HASH_LIMIT:
        digest, rows = hashlib.sha256(), 0
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
                rows += chunk.count(b"\n")
        entry["sha256"] = digest.hexdigest()
        if path.suffix == ".jsonl":
            entry["rows"] = rows
    return entry


def _files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]


def _damage(path: Path, expected: dict[str, Any], hash_files: bool) -> str | None:
    """How `path` differs from its manifest entry, or None."""
    if not path.is_file():
        return "is missing"
    size = path.stat().st_size
    if size == expected["bytes"] and not hash_files:
        return None
    found = _file_entry(path) if size <= HASH_LIMIT else {"bytes": size}
    rows = f"{found['rows']} rows, " if "rows" in found else ""
    if size != expected["bytes"] or found.get("rows", expected.get("rows")) != expected.get("rows"):
        return f"has {rows}{size} bytes"
    if "sha256" in expected and found.get("sha256") != expected["sha256"]:
        return f"has {rows}{size} bytes but a different sha256"
    return None


@dataclass
class Stage:
    """One stage of the run (`t` None) or of iteration t, as the stage functions see it."""

    ledger: Ledger
    name: str
    t: int | None = None

    @property
    def dir(self) -> Path:
        return self.ledger.stage_dir(self.t)

    def done(self) -> bool:
        """Finished: its manifest exists, the recipe still gives it the same inputs (else a RecipeError) and its
        outputs exist (sizes and hashes are checked once per run by `Ledger.verify`)."""
        return self.ledger.check(self.name, self.t, hash_files=False)

    def start(self) -> None:
        """Record the inputs of a stage that leaves resumable state (trainer checkpoints, its `WORK` paths) before
        it writes any: a rerun resumes from that state only with the same inputs (main process)."""
        path = self.ledger.record_path(self.name, self.t, started=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, self.ledger.record(self.name, self.t))

    def commit(self) -> None:
        """Mark the stage done, after all of its outputs (main process)."""
        self.ledger.commit(self.name, self.t)


class Ledger:
    """The manifests of one `output_dir` for a recipe."""

    def __init__(self, output_dir: str | os.PathLike, recipe: Recipe):
        self.output_dir = Path(output_dir)
        self.recipe = recipe
        self.inputs = StageInputs(recipe)

    def stage(self, name: str, t: int | None = None) -> Stage:
        return Stage(self, name, t)

    def stage_dir(self, t: int | None) -> Path:
        return self.output_dir if t is None else self.output_dir / f"iter_{t}"

    def record_path(self, stage: str, t: int | None, started: bool = False) -> Path:
        return self.stage_dir(t) / MANIFEST_DIR / f"{stage}{'.started' if started else ''}.json"

    def _relative(self, path: Path) -> str:
        return str(path.relative_to(self.output_dir))

    def record(self, stage: str, t: int | None) -> dict[str, Any]:
        inputs = self.inputs.of(stage, t)
        return {"stage": stage, "iteration": t, "fingerprint": fingerprint(inputs), "inputs": inputs}

    def read(self, stage: str, t: int | None, started: bool = False) -> dict[str, Any] | None:
        path = self.record_path(stage, t, started)
        if not path.exists():
            return None
        try:
            with open(path) as f:
                return json.load(f)
        except (OSError, ValueError) as error:
            raise RecipeError(f"{path} is damaged ({error}). {self._way_out(stage, t, 'delete it')}") from None

    def commit(self, stage: str, t: int | None) -> None:
        """Write the stage's manifest: its inputs and the size, sha256 and row count of each of its outputs."""
        base = self.stage_dir(t)
        files = {}
        for name in OUTPUTS[stage]:
            for path in _files(base / name) if (base / name).exists() else []:
                files[self._relative(path)] = _file_entry(path)
        record = {**self.record(stage, t), "files": files}
        self.record_path(stage, t).parent.mkdir(parents=True, exist_ok=True)
        write_json(self.record_path(stage, t), record)
        self.record_path(stage, t, started=True).unlink(missing_ok=True)

    # -- checks
    def _way_out(self, stage: str, t: int | None, restore: str) -> str:
        return (
            f"Either {restore}, run the recipe in a new directory (--output_dir=<another directory>), or pass "
            f"{restart_flag(stage, t)} to move the outputs of {stage_label(stage, t)} and of every later stage to "
            f"{self.output_dir / DISCARDED_DIR}/ and compute them again."
        )

    def _check_inputs(self, record: dict[str, Any], stage: str, t: int | None, what: str) -> None:
        current = self.inputs.of(stage, t)
        if record.get("fingerprint") == fingerprint(current):
            return
        changes = changed_fields(record.get("inputs", {}), current)
        shown = "; ".join(changes[:3]) + (f"; and {len(changes) - 3} more" if len(changes) > 3 else "")
        raise RecipeError(
            f"{self.output_dir} holds {what} {stage_label(stage, t)} made with another recipe: {shown or 'unknown'}. "
            f"Reusing it would mix two experiments. "
            + self._way_out(stage, t, f"rerun with the recipe that made it ({self.output_dir / 'recipe.yaml'})")
        )

    def check(self, stage: str, t: int | None, hash_files: bool = True) -> bool:
        """True when `stage` is finished with the recipe's inputs; False when it has no manifest. A manifest made
        with other inputs, or an output that no longer matches it, is a RecipeError naming the field or file."""
        record = self.read(stage, t)
        if record is None:
            return False
        self._check_inputs(record, stage, t, "the finished")
        for relative, expected in record.get("files", {}).items():
            problem = _damage(self.output_dir / relative, expected, hash_files)
            if problem is not None:
                recorded = f"{expected['rows']} rows, " if "rows" in expected else ""
                raise RecipeError(
                    f"{self.output_dir / relative} {problem}, but it had {recorded}{expected['bytes']} bytes when "
                    f"{stage_label(stage, t)} finished: the file is damaged. "
                    + self._way_out(stage, t, "restore it from a copy")
                )
        return True

    def _check_started(self, stage: str, t: int | None) -> None:
        """A stage interrupted with resumable state (trainer checkpoints) resumes only with the inputs it began with."""
        record = self.read(stage, t, started=True)
        work = [self.stage_dir(t) / name for name in WORK.get(stage, ())]
        if record is not None and any(p.is_dir() and any(p.glob("checkpoint-*")) for p in work):
            self._check_inputs(record, stage, t, "checkpoints of the interrupted")

    def stages(self) -> list[tuple[str, int | None]]:
        """Every stage of the recipe, in the order they run."""
        return [(s, None) for s in RUN_STAGES] + [
            (s, t) for t in range(self.recipe.iterations.count) for s in ITERATION_STAGES
        ]

    def verify(self) -> None:
        """Check every finished stage (inputs, then output sizes, row counts and hashes) and every interrupted one
        with checkpoints, most upstream first; raise at the first problem. Cheap: no model, no dataset."""
        for stage, t in self.stages():
            if not self.check(stage, t):
                self._check_started(stage, t)

    # -- restart
    def restart_from(self, stage: str, t: int | None) -> list[Path]:
        """Move the outputs (and work files, manifests) of `stage` and of every later stage to
        `<output_dir>/discarded/<time>/`, keeping their relative paths. Returns the moved paths."""
        order = self.stages()
        targets: list[Path] = []
        for s, u in order[order.index((stage, t)) :]:
            if u != t:  # later iterations are moved whole below
                continue
            base = self.stage_dir(u)
            targets += [base / name for name in (*OUTPUTS[s], *WORK.get(s, ()))]
            targets += [self.record_path(s, u), self.record_path(s, u, started=True)]
        # Every iteration depends on the SFT warm start; nothing depends on the start model's evaluation.
        first = {"sft": 0, "initial_eval": None}.get(stage, None if t is None else t + 1)
        if first is not None:
            targets += sorted(
                (p for p in self.output_dir.glob("iter_*") if p.name[5:].isdigit() and int(p.name[5:]) >= first),
                key=lambda p: int(p.name[5:]),
            )
        targets += [self.output_dir / name for name in DERIVED]
        destination = self.output_dir / DISCARDED_DIR / time.strftime("%Y%m%d-%H%M%S")
        suffix = 1
        while destination.exists():
            destination = destination.with_name(f"{destination.name.split('.')[0]}.{suffix}")
            suffix += 1
        moved = []
        for path in targets:
            if not path.exists():
                continue
            target = destination / path.relative_to(self.output_dir)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(path), str(target))
            moved.append(path)
        return moved


__all__ = ["Ledger", "Stage", "parse_restart", "restart_flag", "stage_label"]
