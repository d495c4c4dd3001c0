"""The method registry: everything the runner, the recipes, the dry run and the model cards know about a method.

A method is one `MethodSpec`: its TRL config and trainer classes (by import path, so reading the registry imports
no torch), what an iteration needs (generation, a judge, annotated responses, K), how the training rows are built
from the stage outputs, and optional hooks (runtime trainer defaults, the hook before training, dry-run extras).
Adding a method means one trainer file and one `register(MethodSpec(...))` call; the runner does not change.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from trl_selfplay.errors import RecipeError

# The runner's defaults for every trainer config (overridable from a recipe's `training`).
BASE_TRAINING_DEFAULTS: Mapping[str, Any] = {"save_strategy": "no", "report_to": "none"}
# Self-play trainers: one pass of π_t over the data before training, so no reference model stays in memory.
PRECOMPUTED_REFERENCE: Mapping[str, Any] = {"precompute_ref_log_probs": True}


@dataclass
class PairInputs:
    """What the pair-building stage hands a method's `build_rows`.

    `generations` are this iteration's rows `{"prompt", "response", "completions", "num_tokens"}`; `previous` the
    generations of earlier iterations to mix in (oldest first); `preferences` the judge's rows (methods with a
    judge); `anchor_samples` one μ sample per prompt (when the config asks for them); `examples` the iteration's
    prompts `{"prompt", "response"}`; `fmt` renders TRL rows (`pair`, `completion`, `sft`).
    """

    examples: list[dict[str, Any]]
    fmt: Any
    generations: list[dict[str, Any]] = field(default_factory=list)
    previous: list[list[dict[str, Any]]] = field(default_factory=list)
    preferences: list[dict[str, Any]] | None = None
    anchor_samples: list[str] | None = None


@dataclass(frozen=True)
class MethodSpec:
    """One self-play (or baseline) method.

    Attributes:
        name: the recipe's `method` value.
        config, trainer: `"module:Class"` of the TRL config and trainer.
        paper, citation: display name and reference for model cards.
        build_rows: `PairInputs -> (rows, num_current)`: the training rows, this iteration's own rows last
            (`num_current` of them; earlier rows come from mixed-in previous iterations).
        generates: samples from π_t every iteration (False: trains on the annotated data only).
        needs_response: the dataset must have annotated responses (`data.response_column`).
        needs_judge: K samples are judged pairwise (a `judge` section is required).
        min_samples, max_samples: allowed `generation.num_samples` (K); `samples_reason` explains the bound.
        default_mix_previous_iterations: default of `data.mix_previous_iterations`; None = mixing not supported.
        uses_anchor: trains against a fixed anchor μ (`model.anchor_name_or_path`, default the start model).
        distinct_samples: pairs are two of the K samples of a prompt, so they must differ: greedy decoding
            (`generation.temperature: 0`) is rejected, and prompts whose chosen and rejected texts tie are skipped.
        uses_iteration_count: `config -> bool`, given an iteration's TRL config: its training depends on
            `iterations.count` (IRIS's `linear` α schedule), so changing the count invalidates finished training.
        training_defaults: the runner's config defaults for this method (on top of `BASE_TRAINING_DEFAULTS`).
        trainer_defaults: `Iteration -> dict` of config defaults known only at run time.
        before_train: `(Iteration, trainer, reference record) -> dict` run after the reference pass and before
            training; the returned entries are added to `reference.json` and logged with a `<name>/` prefix.
    """

    name: str
    config: str
    trainer: str
    paper: str
    citation: str
    build_rows: Callable[[PairInputs], tuple[list[dict[str, Any]], int]]
    generates: bool = True
    needs_response: bool = True
    needs_judge: bool = False
    min_samples: int = 1
    max_samples: int | None = 1
    samples_reason: str = "one generated response is paired with each annotated one"
    default_mix_previous_iterations: int | None = None
    uses_anchor: bool = False
    distinct_samples: bool = False
    uses_iteration_count: Callable[[Any], bool] | None = None
    training_defaults: Mapping[str, Any] = field(default_factory=lambda: dict(PRECOMPUTED_REFERENCE))
    trainer_defaults: Callable[[Any], dict[str, Any]] | None = None
    before_train: Callable[[Any, Any, dict[str, Any]], dict[str, Any]] | None = None

    def config_class(self) -> type:
        return _import(self.config)

    def trainer_class(self) -> type:
        return _import(self.trainer)

    def default_training_config(self) -> dict[str, Any]:
        return {**BASE_TRAINING_DEFAULTS, **self.training_defaults}


def _import(path: str) -> Any:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


_REGISTRY: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    """Add (or replace) a method; recipes with `method: <spec.name>` then run it."""
    _REGISTRY[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def method_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def get_method(name: str) -> MethodSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise RecipeError(f"`method` must be one of {list(_REGISTRY)}, got {name!r}.") from None


# ------------------------------------------------------------------------------------------ the built-in methods


def annotated_vs_generated_rows(inputs: PairInputs) -> tuple[list[dict[str, Any]], int]:
    """SPIN / IRIS: chosen = the annotated response, rejected = π_t's sample; as the original SPIN
    (`spin/run_spin.py` of uclaml/SPIN), the previous iterations' pairs are trained on again."""
    rows = [
        inputs.fmt.pair(g["prompt"], g["response"], g["completions"][0])
        for gens in [*inputs.previous, inputs.generations]
        for g in gens
    ]
    return rows, len(inputs.generations)


def judged_rows(inputs: PairInputs) -> tuple[list[dict[str, Any]], int]:
    """RSPO / SPPO: chosen / rejected are the judge's picks among the K samples, with their win probabilities;
    `anchor_completion` carries a μ sample when the `forward_kl` regularizer asks for one."""
    rows = []
    for gen, pref in zip(inputs.generations, inputs.preferences or [], strict=True):
        c, r = pref["chosen_index"], pref["rejected_index"]
        row = inputs.fmt.pair(gen["prompt"], gen["completions"][c], gen["completions"][r])
        row["chosen_win_prob"] = pref["win_probs"][c]
        row["rejected_win_prob"] = pref["win_probs"][r]
        rows.append(row)
    if inputs.anchor_samples is not None:
        for row, sample in zip(rows, inputs.anchor_samples, strict=True):
            row["anchor_completion"] = inputs.fmt.completion(sample)
    return rows, len(rows)


def sft_rows(inputs: PairInputs) -> tuple[list[dict[str, Any]], int]:
    """Continued SFT: the iteration's prompts with their annotated responses."""
    rows = [inputs.fmt.sft(e["prompt"], e["response"]) for e in inputs.examples]
    return rows, len(rows)


def _rspo_trainer_defaults(it: Any) -> dict[str, Any]:
    """μ for the trainer: none at iteration 0 without an explicit anchor (μ = π_0, the trainer reuses the
    reference), otherwise μ's path (with the recipe's revision when μ is the pinned start model)."""
    if it.anchor == it.policy:
        return {"anchor_model_name_or_path": None}
    defaults: dict[str, Any] = {"anchor_model_name_or_path": it.anchor}
    revision = it.model_kwargs(it.anchor).get("revision")
    if revision is not None:
        defaults["anchor_model_init_kwargs"] = {"revision": revision}
    return defaults


def _iris_before_train(it: Any, trainer: Any, reference: dict[str, Any]) -> dict[str, Any]:
    """IRIS's α_t from the distributional gap D̂_t of this iteration's reference pass (docs/methods.md)."""
    import torch

    from trl_selfplay.losses import distribution_gap, iris_alpha

    start = reference["current_rows"][0]
    gap = float(
        distribution_gap(
            *(torch.tensor(reference[key][start:]) for key in ("ref_chosen_logps", "ref_rejected_logps")),
            *(torch.tensor(reference[key][start:]) for key in ("chosen_lengths", "rejected_lengths")),
        )
    )
    initial_gap = gap if it.t == 0 else float(it.read_reference(0)["gap"])
    cfg = trainer.args
    alpha = iris_alpha(
        cfg.alpha_schedule, it.t, it.num_iterations, alpha=cfg.alpha, alpha_start=cfg.alpha_start,
        alpha_end=cfg.alpha_end, gap=gap, initial_gap=initial_gap,
    )  # fmt: skip
    cfg.alpha = float(alpha)  # the trainer reads `args.alpha` at every step
    it.log(f"IRIS gap D_t={gap:.4f} (D_0={initial_gap:.4f}) -> alpha_t={alpha:.4f}")
    return {"gap": gap, "initial_gap": initial_gap, "alpha": float(alpha)}


def _iris_uses_iteration_count(config: Any) -> bool:
    """The `linear` α schedule spreads α over `iterations.count` iterations (`trl_selfplay.losses.iris_alpha`)."""
    return config.alpha_schedule == "linear"


register(
    MethodSpec(
        name="spin",
        config="trl_selfplay.trainers.spin:SPINConfig",
        trainer="trl_selfplay.trainers.spin:SPINTrainer",
        paper="SPIN",
        citation="Chen et al., ICML 2024, *Self-Play Fine-Tuning Converts Weak Language Models to Strong Language "
        "Models* ([arXiv:2401.01335](https://arxiv.org/abs/2401.01335))",
        build_rows=annotated_vs_generated_rows,
        default_mix_previous_iterations=1,
    )
)
register(
    MethodSpec(
        name="iris",
        config="trl_selfplay.trainers.iris:IRISConfig",
        trainer="trl_selfplay.trainers.iris:IRISTrainer",
        paper="IRIS",
        citation="Liao et al., 2026, *Interpolative Rényi Iterative Self-play* (arXiv:2604.20933); the loss is this "
        "package's reconstruction from the variational Rényi divergence",
        build_rows=annotated_vs_generated_rows,
        default_mix_previous_iterations=0,
        before_train=_iris_before_train,
        uses_iteration_count=_iris_uses_iteration_count,
    )
)
register(
    MethodSpec(
        name="rspo",
        config="trl_selfplay.trainers.rspo:RSPOConfig",
        trainer="trl_selfplay.trainers.rspo:RSPOTrainer",
        paper="RSPO",
        citation="Tang et al., *Regularized Self-Play Alignment of Large Language Models* "
        "([arXiv:2503.00030](https://arxiv.org/abs/2503.00030)), built on SPPO (Wu et al., 2024)",
        build_rows=judged_rows,
        needs_response=False,
        needs_judge=True,
        min_samples=2,
        max_samples=None,
        samples_reason="preferences compare samples of the same prompt (the paper uses 5)",
        uses_anchor=True,
        distinct_samples=True,
        trainer_defaults=_rspo_trainer_defaults,
    )
)
register(
    MethodSpec(
        name="sft",
        config="trl:SFTConfig",
        trainer="trl:SFTTrainer",
        paper="continued SFT",
        citation="the supervised fine-tuning baseline the SPIN and IRIS papers compare against",
        build_rows=sft_rows,
        generates=False,
        training_defaults={},
    )
)
