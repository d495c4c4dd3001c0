"""What each stage's output depends on: the recipe fields (and upstream stages) that went into it.

`StageInputs(recipe).of(stage, t)` is a flat mapping `"<section>.<field>[@<t>]" -> value` (`@t` marks a field of
iteration t's resolved recipe; no suffix, a field of the run as a whole), closed over every upstream stage: iteration
t's training depends on its pairs, which depend on its generations, which depend on π_t, i.e. on iteration t − 1's
training, and so on back to `model.*`. A stage's fingerprint is the hash of that mapping; the manifest of a finished
stage stores both, so a rerun with a different recipe can name the field that changed (`trl_selfplay.runner.manifest`).

Fields that cannot change a stage's output are left out, so changing them reuses the finished work: the Hub section,
the batch sizes of generation and judging (sampling is seeded per prompt), and the trainer's logging, checkpointing,
reporting and data-loading fields (`NEUTRAL_TRAINING_FIELDS`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from trl_selfplay.methods import get_method
from trl_selfplay.recipes import Recipe, anchor_model, build_training_config, resolve_batch, start_model

# Per-run stages (no iteration index) and the stages of one iteration, in the order they run.
RUN_STAGES = ("sft", "initial_eval")
ITERATION_STAGES = ("generate", "anchor_generations", "judge", "pairs", "train", "evaluate", "summary")

# Trainer fields that change what is logged, saved or reported, never the trained weights.
NEUTRAL_TRAINING_FIELDS = frozenset({
    "logging_strategy", "logging_steps", "logging_first_step", "log_on_each_node", "logging_nan_inf_filter",
    "log_level", "log_level_replica", "disable_tqdm", "report_to", "run_name", "skip_memory_metrics", "metric_outputs",
    "save_strategy", "save_steps", "save_total_limit", "save_only_model", "save_on_each_node", "push_to_hub",
    "hub_model_id", "hub_strategy", "hub_token", "hub_private_repo", "hub_always_push", "hub_revision",
    "dataloader_num_workers", "dataloader_pin_memory", "dataloader_persistent_workers", "dataloader_prefetch_factor",
})  # fmt: skip
# Fields of `data` that decide which prompts (and annotated responses) an iteration reads.
EXAMPLE_FIELDS = (
    "dataset_name", "dataset_config", "data_files", "dataset_fn", "revision", "split", "prompt_column",
    "response_column", "num_prompts", "seed", "num_folds",
)  # fmt: skip
# How training rows render prompts and responses (`TrainingFormat`).
FORMAT_FIELDS = ("data.train_prompt_format", "data.system_message", "generation.prompt_template")
MODEL_FIELDS = ("name_or_path", "revision", "dtype", "trust_remote_code", "build_fn")


def fingerprint(inputs: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of a stage's inputs."""
    text = json.dumps(inputs, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def describe_key(key: str) -> str:
    """`"training.beta@1"` → "`training.beta` of iteration 1"; `"model.dtype"` → "`model.dtype`"."""
    name, _, t = key.partition("@")
    return f"`{name}` of iteration {t}" if t else f"`{name}`"


def changed_fields(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """One sentence per input that differs, most upstream first (run-level fields, then by iteration)."""

    def order(key: str) -> tuple[int, str]:
        name, _, t = key.partition("@")
        return (int(t) + 1 if t else 0, name)

    missing = object()
    out = []
    for key in sorted(set(recorded) | set(current), key=order):
        old, new = recorded.get(key, missing), current.get(key, missing)
        if old == new:
            continue
        if old is missing:
            out.append(f"{describe_key(key)} is now {new!r} (it was not set)")
        elif new is missing:
            out.append(f"{describe_key(key)} was {old!r} and is no longer set")
        else:
            out.append(f"{describe_key(key)} was {old!r} and is now {new!r}")
    return out


def _asdict(section: Any) -> dict[str, Any]:
    return dataclasses.asdict(section) if dataclasses.is_dataclass(section) else dict(section or {})


class StageInputs:
    """The inputs of every stage of a validated recipe (computed from the recipe alone, memoised)."""

    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self._cache: dict[tuple[str, int | None], dict[str, Any]] = {}

    def of(self, stage: str, t: int | None = None) -> dict[str, Any]:
        key = (stage, t)
        if key not in self._cache:
            if stage in RUN_STAGES:
                self._cache[key] = getattr(self, f"_{stage}")()
            elif stage in ITERATION_STAGES:
                if t is None:
                    raise ValueError(f"stage {stage!r} belongs to an iteration: pass t.")
                self._cache[key] = getattr(self, f"_{stage}")(t)
            else:
                raise ValueError(f"unknown stage {stage!r}; stages: {RUN_STAGES + ITERATION_STAGES}.")
        return self._cache[key]

    # -- building blocks
    def _fields(self, t: int | None, section: str, values: dict[str, Any], exclude=()) -> dict[str, Any]:
        suffix = "" if t is None else f"@{t}"
        return {f"{section}.{k}{suffix}": v for k, v in values.items() if k not in exclude}

    def _at(self, t: int | None) -> Recipe:
        return self.recipe if t is None else self.recipe.for_iteration(t)

    def _model(self) -> dict[str, Any]:
        m = _asdict(self.recipe.model)
        return self._fields(None, "model", {k: m[k] for k in MODEL_FIELDS})

    def _examples(self, t: int | None) -> dict[str, Any]:
        d = _asdict(self._at(t).data)
        return self._fields(t, "data", {k: d[k] for k in EXAMPLE_FIELDS})

    def _format(self, t: int | None) -> dict[str, Any]:
        r = self._at(t)
        suffix = "" if t is None else f"@{t}"
        values = {
            "data.train_prompt_format": r.data.train_prompt_format,
            "data.system_message": r.data.system_message,
            "generation.prompt_template": r.generation.prompt_template,
        }
        return {f"{k}{suffix}": v for k, v in values.items()}

    def _generation(self, t: int) -> dict[str, Any]:
        return self._fields(t, "generation", _asdict(self._at(t).generation), exclude={"batch_size"})

    def _training(self, t: int | None, section: str, training: dict[str, Any]) -> dict[str, Any]:
        return self._fields(t, section, training, exclude=NEUTRAL_TRAINING_FIELDS)

    def policy(self, t: int) -> dict[str, Any]:
        """π_t: the start model (after the optional SFT warm start) at t = 0, iteration t − 1's training after."""
        if t > 0:
            return self.of("train", t - 1)
        return self.of("sft") if self.recipe.sft is not None else self._model()

    def anchor(self) -> dict[str, Any]:
        """μ: `model.anchor_name_or_path`, else the model iteration 0 starts from."""
        if self.recipe.model.anchor_name_or_path:
            return {"model.anchor_name_or_path": self.recipe.model.anchor_name_or_path}
        return self.policy(0)

    def _config(self, t: int) -> Any:
        """Iteration t's TRL config, for the choices it derives from the `training` fields."""
        r = self._at(t)
        return build_training_config(
            r.method, resolve_batch(r, r.training, 1), "/tmp/trl-selfplay-fingerprint", for_validation=True
        )

    # -- stages
    def _sft(self) -> dict[str, Any]:
        r = self.recipe
        return {
            **self._model(),
            **self._examples(None),
            **self._format(None),
            "sft.num_examples": r.sft.num_examples,
            "global_batch_size": r.global_batch_size,
            **self._training(None, "sft.training", r.sft.training),
        }

    def _initial_eval(self) -> dict[str, Any]:
        ev = self.recipe.evaluation
        values = {} if ev is None else {"function": ev.function, **ev.kwargs}
        return {**self.policy(0), **self._fields(None, "evaluation", values)}

    def _generate(self, t: int) -> dict[str, Any]:
        return {**self.policy(t), **self._examples(t), **self._generation(t)}

    def _anchor_generations(self, t: int) -> dict[str, Any]:
        return {"anchor": True, **self.anchor(), **self._examples(t), **self._generation(t)}

    def _judge(self, t: int) -> dict[str, Any]:
        r = self._at(t)
        judge = self._fields(t, "judge", _asdict(r.judge), exclude={"batch_size"}) if r.judge is not None else {}
        return {**self.of("generate", t), **judge}

    def _pairs(self, t: int) -> dict[str, Any]:
        r = self._at(t)
        spec = get_method(r.method)
        out: dict[str, Any] = {"method": r.method, **self._examples(t), **self._format(t)}
        if spec.generates:
            mix = r.data.mix_previous_iterations
            mix = (spec.default_mix_previous_iterations or 0) if mix is None else mix
            out[f"data.mix_previous_iterations@{t}"] = mix
            for s in range(max(0, t - mix), t + 1):
                out.update(self.of("generate", s))
        if spec.needs_judge:
            out.update(self.of("judge", t))
        if spec.generates and getattr(self._config(t), "needs_anchor_samples", False):
            own = anchor_model(r) == start_model(r, t)  # μ = π_t: sample 0 of π_t's K samples is μ's
            out.update({f"anchor_samples@{t}": True, **({} if own else self.of("anchor_generations", t))})
        return out

    def _train(self, t: int) -> dict[str, Any]:
        r = self._at(t)
        spec = get_method(r.method)
        out = {
            **self.of("pairs", t),
            **self.policy(t),
            "global_batch_size": r.global_batch_size,
            **self._training(t, "training", r.training),
        }
        if spec.uses_anchor:
            out.update(self.anchor())
        if spec.uses_iteration_count is not None and spec.uses_iteration_count(self._config(t)):
            out["iterations.count"] = r.iterations.count
        return out

    def _evaluate(self, t: int) -> dict[str, Any]:
        ev = self._at(t).evaluation
        values = {} if ev is None else {"function": ev.function, **ev.kwargs}
        return {**self.of("train", t), **self._fields(t, "evaluation", values)}

    def _summary(self, t: int) -> dict[str, Any]:
        return {**self.of("train", t), **self.of("evaluate", t)}
