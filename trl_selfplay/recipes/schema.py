"""The recipe schema: one dataclass per section, and the type checker that turns YAML values into them.

Every field here is a recipe key; `docs/pipeline.md` and the format reference in `trl_selfplay.recipes` describe
them. Unknown keys and wrong types fail with one message naming the field (and the nearest valid key).
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from trl_selfplay.errors import RecipeError

# Sections an `iterations.overrides.<t>` entry may change; the others define the run as a whole.
OVERRIDABLE_SECTIONS = ("data", "generation", "judge", "training", "evaluation")
DEFAULT_EVALUATION_FUNCTION = "trl_selfplay.evaluation:evaluate_iteration"
TOP_LEVEL_KEYS = (
    "method", "output_dir", "model", "data", "generation", "judge", "training", "iterations", "hub", "sft",
    "evaluation", "global_batch_size",
)  # fmt: skip

__all__ = ["RecipeError"]


@dataclass
class ModelArgs:
    """The model iteration 0 starts from."""

    name_or_path: str
    revision: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    trust_remote_code: bool = False
    anchor_name_or_path: str | None = None
    build_fn: str | None = None


@dataclass
class DataArgs:
    """Where prompts (and annotated responses) come from, and how many are used per iteration."""

    dataset_name: str | None = None
    dataset_config: str | None = None
    data_files: str | list[str] | dict[str, Any] | None = None
    dataset_fn: str | None = None
    revision: str | None = None
    split: str = "train"
    prompt_column: str = "prompt"
    response_column: str | None = None
    num_prompts: int | None = None
    seed: int = 42
    num_folds: int = 1
    mix_previous_iterations: int | None = None
    # How the training pairs render the prompt: "generation" = exactly as generation formatted it (a fixed
    # `generation.prompt_template`, else the chat template); "chat_template" = the model's chat template with
    # `system_message` (when not null) as a system turn, as the original SPIN trains (`spin/alignment/data.py`).
    train_prompt_format: Literal["generation", "chat_template"] = "generation"
    system_message: str | None = None


@dataclass
class GenerationArgs:
    """Sampling from the current policy π_t (see `trl_selfplay.generation.generate_completions`)."""

    backend: Literal["transformers", "vllm"] = "transformers"
    num_samples: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    seed: int = 0
    prompt_template: str | None = None
    # None: special tokens (BOS) are added to plain-text prompts only; false: never (the original SPIN's
    # `spin/generate.py` tokenizes its fixed template with add_special_tokens=False); true: always.
    add_special_tokens: bool | None = None
    batch_size: int = 16
    backend_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class JudgeArgs:
    """Pairwise preferences among the K samples (RSPO)."""

    type: Literal["pairrm", "function"] = "pairrm"
    model_name_or_path: str = "llm-blender/PairRM"
    function: str | None = None
    kind: Literal["reward", "pairwise"] = "reward"
    # How the K x K preferences, win probabilities and the chosen / rejected pair are derived: "aggregate" = the
    # SPPO/RSPO pipeline (uclaml/SPPO `scripts/rank.py` + `scripts/compute_prob.py`: one score per sample, pair =
    # argmax / argmin of the scores); "pairwise" = sigma of both-order logit differences, pair by win rate.
    # null: aggregate for PairRM (as the originals), pairwise for function judges.
    mode: Literal["aggregate", "pairwise"] | None = None
    # What the judge reads as the prompt: "chat_template" = the policy's chat template rendering of the user turn,
    # cut before the assistant content (SPPO's `apply_template`); "raw" = the prompt text as in the dataset.
    # null: chat_template for PairRM (as the originals), raw for function judges.
    prompt_format: Literal["chat_template", "raw"] | None = None
    temperature: float = 1.0
    batch_size: int = 32
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class IterationsArgs:
    count: int = 1
    overrides: dict[int, dict[str, Any]] = field(default_factory=dict)


@dataclass
class HubArgs:
    push: bool = False
    model_id: str | None = None
    private: bool = False


@dataclass
class SFTStageArgs:
    num_examples: int | None = None
    training: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvaluationArgs:
    function: str = DEFAULT_EVALUATION_FUNCTION
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class Recipe:
    """A validated recipe, resolved for one iteration (`iteration`) or for the run as a whole (`iteration=None`)."""

    method: str
    output_dir: str
    model: ModelArgs
    data: DataArgs
    generation: GenerationArgs
    training: dict[str, Any]
    judge: JudgeArgs | None = None
    iterations: IterationsArgs = field(default_factory=IterationsArgs)
    hub: HubArgs = field(default_factory=HubArgs)
    sft: SFTStageArgs | None = None
    evaluation: EvaluationArgs | None = None
    global_batch_size: int | None = None
    source: str = "<recipe>"
    iteration: int | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)
    # The run's recipe resolved for each iteration (filled by the parser; empty on a resolved recipe).
    resolved: dict[int, Recipe] = field(default_factory=dict, repr=False)

    @property
    def num_iterations(self) -> int:
        return self.iterations.count

    def for_iteration(self, t: int) -> Recipe:
        """The recipe with `iterations.overrides[t]` applied (overrides are not carried to later iterations)."""
        if t not in self.resolved:
            raise RecipeError(f"{self.source}: iteration {t} is outside 0..{self.iterations.count - 1}.")
        return self.resolved[t]


def type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def check_value(value: Any, tp: Any, name: str) -> Any:
    """Return `value` (numeric strings such as YAML's `5e-7` become floats) or raise one clear error."""
    if isinstance(tp, str) or tp is Any or tp is object:
        return value  # unresolved forward reference or untyped: the config class validates it
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise RecipeError(f"`{name}` must not be null (expected {type_name(tp)}).")
        for arg in args:
            if arg is type(None):
                continue
            try:
                return check_value(value, arg, name)
            except RecipeError:
                continue
        raise RecipeError(f"`{name}` has the wrong type: expected {type_name(tp)}, got {value!r}.")
    if origin is Literal:
        if value in args:
            return value
        suggestion = suggest(str(value), [str(a) for a in args])
        raise RecipeError(f"`{name}` must be one of {list(args)}, got {value!r}.{suggestion}")
    if value is None:
        raise RecipeError(f"`{name}` must not be null (expected {type_name(tp)}).")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise RecipeError(f"`{name}` must be true or false, got {value!r}.")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise RecipeError(f"`{name}` must be an integer, got {value!r}.")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:  # YAML 1.1 reads `5e-7` (no dot) as a string
                return float(value)
            except ValueError:
                pass
        raise RecipeError(f"`{name}` must be a number, got {value!r}.")
    if tp is str:
        if isinstance(value, str):
            return value
        raise RecipeError(f"`{name}` must be a string, got {value!r}.")
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, list | tuple):
            if args:  # TRL list fields (loss_type, report_to, ...) also take a single value
                return check_value(value, args[0], name)
            raise RecipeError(f"`{name}` must be a list, got {value!r}.")
        if args:
            return [check_value(v, args[0], f"{name}[{i}]") for i, v in enumerate(value)]
        return list(value)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"`{name}` must be a mapping, got {value!r}.")
        if len(args) == 2:
            return {k: check_value(v, args[1], f"{name}.{k}") for k, v in value.items()}
        return value
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        valid = [m.value for m in tp]
        if value in valid or isinstance(value, tp):
            return value
        raise RecipeError(f"`{name}` must be one of {valid}, got {value!r}.{suggest(str(value), map(str, valid))}")
    return value


def suggest(key: str, candidates) -> str:
    match = difflib.get_close_matches(key, list(candidates), n=1, cutoff=0.5)
    return f" Did you mean `{match[0]}`?" if match else ""


def build_section(cls, value: Any, prefix: str):
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise RecipeError(f"`{prefix}` must be a mapping of fields, got {value!r}.")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, item in value.items():
        if key not in names:
            raise RecipeError(f"Unknown key `{prefix}.{key}`.{suggest(str(key), names)} Valid keys: {names}.")
        kwargs[key] = check_value(item, hints[key], f"{prefix}.{key}")
    required = [
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    for name in required:
        if name not in kwargs:
            raise RecipeError(f"`{prefix}.{name}` is required.")
    return cls(**kwargs)
