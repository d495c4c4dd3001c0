"""YAML recipes: one file describes one full multi-iteration self-play run.

A recipe is read with `yaml.safe_load`, validated completely (types, unknown keys with the nearest valid key
suggested, the method's TRL config built once per iteration) and resolved per iteration, all before any model or
dataset is loaded. `trl-selfplay --dry-run recipe.yaml` prints what each iteration would run.

Format (every section but `method`, `model`, `data` and `output_dir` is optional)::

    method: spin                       # spin | iris | rspo | sft (continued-SFT baseline: each iteration trains
                                       # trl.SFTTrainer on the same prompts' annotated responses with the same
                                       # epochs and batch size as the self-play run, no generation)
    output_dir: runs/zephyr-spin       # iteration t writes to <output_dir>/iter_<t>/
    global_batch_size: 64              # optional: gradient_accumulation_steps is derived from it at launch time
    model:
      name_or_path: alignment-handbook/zephyr-7b-sft-full
      revision: null                   # pin a Hub revision (commit sha) for reproducibility
      dtype: bfloat16                  # auto | float32 | bfloat16 | float16
      trust_remote_code: false
      anchor_name_or_path: null        # RSPO μ; default: the model iteration 0 starts from
      build_fn: null                   # "module:function" called as fn(name_or_path) when the path does not exist
    data:
      dataset_name: HuggingFaceH4/ultrachat_200k   # Hub dataset, a local directory (save_to_disk) or a data file
      dataset_config: null
      data_files: null
      dataset_fn: null                 # alternative: "module:function" returning a datasets.Dataset (split=...)
      split: train_sft
      prompt_column: prompt            # a string, or a conversation whose first user turn is the prompt
      response_column: messages        # annotated answer (spin/iris/sft): a string or a conversation (first
                                       # assistant turn after the prompt)
      num_prompts: 50000               # first N prompts after a seeded shuffle; null = all
      seed: 42
      num_folds: 1                     # RSPO: prompts split in folds, iteration t uses fold t mod num_folds
      mix_previous_iterations: 1       # SPIN: also train on the generated pairs of the previous N iterations
    generation:
      backend: transformers            # transformers | vllm
      num_samples: 1                   # K completions per prompt (RSPO: K >= 2)
      temperature: 1.0
      top_p: 1.0
      max_new_tokens: 256
      seed: 0                          # iteration t samples with seed + t
      prompt_template: null            # null = chat template; else a string with {prompt}. The SAME formatting
                                       # is used for training, so generation and training see the same prompt.
      batch_size: 16
      backend_kwargs: {}               # e.g. vLLM: {tensor_parallel_size: 8, gpu_memory_utilization: 0.9}
    judge:                             # RSPO only
      type: pairrm                     # pairrm | function
      model_name_or_path: llm-blender/PairRM
      function: null                   # type function: "module:function"
      kind: reward                     # function judges: reward (fn(prompts, completions) -> scores) | pairwise
      temperature: 1.0
      batch_size: 32
      kwargs: {}                       # extra keyword arguments of the judge class
    training:                          # fields of the method's TRL config (SPINConfig, IRISConfig, RSPOConfig,
      learning_rate: 5.0e-7            # trl.SFTConfig), with TRL's names. `warmup_ratio` is mapped to
      beta: 0.1                        # transformers 5's fractional `warmup_steps`.
    iterations:
      count: 4
      overrides:                       # per-iteration deep overrides of data/generation/judge/training/evaluation
        3: {training: {beta: 5.0}}     # (each applies to that iteration only)
    hub:
      push: false
      model_id: my-org/zephyr-7b-spin  # iteration t is pushed to its own repo "<model_id>-iter<t>"
      private: false
    sft:                               # optional warm start before iteration 0 (trl.SFTTrainer on the annotated
      num_examples: null               # data; null = every row of the dataset split), written to <output_dir>/sft/
      training: {learning_rate: 2.0e-4, num_train_epochs: 1}
    evaluation:                        # optional, run after the start model and after every iteration
      function: trl_selfplay.evaluation:evaluate_iteration
      <any other key>: passed to the function as a keyword argument (checked against its signature)

Evaluation hook contract: the function is called on the main process as
``fn(model_name_or_path=..., previous_model_name_or_path=..., iteration=..., output_dir=..., prompt_template=...,
judge=..., generation=..., seed=..., **kwargs)`` (only the parameters its signature accepts, or all of them if it
takes ``**kwargs``) and returns a dict of JSON-serialisable metrics. For the start model `iteration` is -1 and
`previous_model_name_or_path` is None. The loop appends one line per evaluated model to
`<output_dir>/metrics.jsonl`: ``{"iteration": t, "num_completed_iterations": t + 1, "method": ..., "model": ...,
"train": {...}, "eval": {...}}``.

CLI overrides use dotted keys with YAML-typed values: ``--training.learning_rate=1e-6``,
``--iterations.overrides.3.training.beta=5.0``, ``--generation.prompt_template=null``.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import enum
import importlib
import inspect
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

METHODS = ("spin", "iris", "rspo", "sft")
# Sections an `iterations.overrides.<t>` entry may change; the others define the run as a whole.
OVERRIDABLE_SECTIONS = ("data", "generation", "judge", "training", "evaluation")
DEFAULT_EVALUATION_FUNCTION = "trl_selfplay.evaluation:evaluate_iteration"


class RecipeError(ValueError):
    """A recipe is invalid; the message names the field and the fix."""


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
    batch_size: int = 16
    backend_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class JudgeArgs:
    """Pairwise preferences among the K samples (RSPO)."""

    type: Literal["pairrm", "function"] = "pairrm"
    model_name_or_path: str = "llm-blender/PairRM"
    function: str | None = None
    kind: Literal["reward", "pairwise"] = "reward"
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

    @property
    def num_iterations(self) -> int:
        return self.iterations.count

    def for_iteration(self, t: int) -> Recipe:
        """The recipe with `iterations.overrides[t]` applied (overrides are not carried to later iterations)."""
        if not 0 <= t < self.iterations.count:
            raise RecipeError(f"{self.source}: iteration {t} is outside 0..{self.iterations.count - 1}.")
        resolved = _deep_merge(copy.deepcopy(self.raw), self.iterations.overrides.get(t, {}))
        recipe = _parse(resolved, self.source)
        recipe.iteration = t
        recipe.raw = self.raw
        return recipe


# ----------------------------------------------------------------------------------------------- type checking


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _check_value(value: Any, tp: Any, name: str) -> Any:
    """Return `value` (numeric strings such as YAML's `5e-7` become floats) or raise one clear error."""
    if isinstance(tp, str) or tp is Any or tp is object:
        return value  # unresolved forward reference or untyped: the config class validates it
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise RecipeError(f"`{name}` must not be null (expected {_type_name(tp)}).")
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_value(value, arg, name)
            except RecipeError:
                continue
        raise RecipeError(f"`{name}` has the wrong type: expected {_type_name(tp)}, got {value!r}.")
    if origin is Literal:
        if value in args:
            return value
        suggestion = _suggest(str(value), [str(a) for a in args])
        raise RecipeError(f"`{name}` must be one of {list(args)}, got {value!r}.{suggestion}")
    if value is None:
        raise RecipeError(f"`{name}` must not be null (expected {_type_name(tp)}).")
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
                return _check_value(value, args[0], name)
            raise RecipeError(f"`{name}` must be a list, got {value!r}.")
        if args:
            return [_check_value(v, args[0], f"{name}[{i}]") for i, v in enumerate(value)]
        return list(value)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"`{name}` must be a mapping, got {value!r}.")
        if len(args) == 2:
            return {k: _check_value(v, args[1], f"{name}.{k}") for k, v in value.items()}
        return value
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        valid = [m.value for m in tp]
        if value in valid or isinstance(value, tp):
            return value
        raise RecipeError(f"`{name}` must be one of {valid}, got {value!r}.{_suggest(str(value), map(str, valid))}")
    return value


def _suggest(key: str, candidates) -> str:
    match = difflib.get_close_matches(key, list(candidates), n=1, cutoff=0.5)
    return f" Did you mean `{match[0]}`?" if match else ""


def _build_section(cls, value: Any, prefix: str):
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise RecipeError(f"`{prefix}` must be a mapping of fields, got {value!r}.")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, item in value.items():
        if key not in names:
            raise RecipeError(f"Unknown key `{prefix}.{key}`.{_suggest(str(key), names)} Valid keys: {names}.")
        kwargs[key] = _check_value(item, hints[key], f"{prefix}.{key}")
    required = [
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    for name in required:
        if name not in kwargs:
            raise RecipeError(f"`{prefix}.{name}` is required.")
    return cls(**kwargs)


# ---------------------------------------------------------------------------------------------------- parsing

_TOP_LEVEL = {
    "method",
    "output_dir",
    "model",
    "data",
    "generation",
    "judge",
    "training",
    "iterations",
    "hub",
    "sft",
    "evaluation",
    "global_batch_size",
}


def _deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in (update or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def import_callable(spec: str, name: str):
    """Import `"package.module:function"`; raise one clear error naming the recipe field otherwise."""
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise RecipeError(f"`{name}` must look like 'package.module:function', got {spec!r}.")
    module_name, attr = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise RecipeError(f"`{name}`: cannot import module {module_name!r} ({error}).") from error
    if not hasattr(module, attr):
        raise RecipeError(f"`{name}`: module {module_name!r} has no attribute {attr!r}.")
    fn = getattr(module, attr)
    if not callable(fn):
        raise RecipeError(f"`{name}`: {spec!r} is not callable.")
    return fn


def _parse_iterations(value: Any) -> IterationsArgs:
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise RecipeError(f"`iterations` must be a mapping with `count` and `overrides`, got {value!r}.")
    for key in value:
        if key not in ("count", "overrides"):
            raise RecipeError(f"Unknown key `iterations.{key}`.{_suggest(str(key), ['count', 'overrides'])}")
    count = _check_value(value.get("count", 1), int, "iterations.count")
    if count < 1:
        raise RecipeError(f"`iterations.count` must be >= 1, got {count}.")
    overrides_raw = value.get("overrides") or {}
    if not isinstance(overrides_raw, dict):
        raise RecipeError("`iterations.overrides` must map an iteration index to the fields it changes.")
    overrides: dict[int, dict[str, Any]] = {}
    for key, update in overrides_raw.items():
        try:
            t = int(key)
        except (TypeError, ValueError):
            raise RecipeError(f"`iterations.overrides` keys are iteration indices, got {key!r}.") from None
        if not 0 <= t < count:
            raise RecipeError(f"`iterations.overrides.{t}`: iteration {t} is outside 0..{count - 1}.")
        if not isinstance(update, dict):
            raise RecipeError(f"`iterations.overrides.{t}` must be a mapping such as {{training: {{beta: 5.0}}}}.")
        for section in update:
            if section not in OVERRIDABLE_SECTIONS:
                raise RecipeError(
                    f"`iterations.overrides.{t}.{section}` cannot change per iteration; overridable sections: "
                    f"{list(OVERRIDABLE_SECTIONS)}.{_suggest(str(section), OVERRIDABLE_SECTIONS)}"
                )
        overrides[t] = update
    return IterationsArgs(count=count, overrides=overrides)


def _parse(raw: dict[str, Any], source: str) -> Recipe:
    if not isinstance(raw, dict):
        raise RecipeError(f"{source}: a recipe must be a YAML mapping, got {type(raw).__name__}.")
    for key in raw:
        if key not in _TOP_LEVEL:
            raise RecipeError(
                f"Unknown key `{key}`.{_suggest(str(key), _TOP_LEVEL)} Valid keys: {sorted(_TOP_LEVEL)}."
            )
    if "method" not in raw:
        raise RecipeError(f"`method` is required: one of {list(METHODS)}.")
    method = raw["method"]
    if method not in METHODS:
        raise RecipeError(f"`method` must be one of {list(METHODS)}, got {method!r}.{_suggest(str(method), METHODS)}")
    if "output_dir" not in raw:
        raise RecipeError("`output_dir` is required: the directory the iterations are written to.")
    output_dir = _check_value(raw["output_dir"], str, "output_dir")
    if "model" not in raw:
        raise RecipeError("`model` is required, e.g. `model: {name_or_path: <Hub id or local path>}`.")
    model = _build_section(ModelArgs, raw["model"], "model")
    if "data" not in raw:
        raise RecipeError("`data` is required, e.g. `data: {dataset_name: <Hub id or local path>}`.")
    data = _build_section(DataArgs, raw["data"], "data")
    generation = _build_section(GenerationArgs, raw.get("generation"), "generation")
    judge = _build_section(JudgeArgs, raw["judge"], "judge") if raw.get("judge") is not None else None
    training = raw.get("training") or {}
    if not isinstance(training, dict):
        raise RecipeError(f"`training` must be a mapping of {method} config fields, got {training!r}.")
    iterations = _parse_iterations(raw.get("iterations"))
    hub = _build_section(HubArgs, raw.get("hub"), "hub")
    sft = _build_section(SFTStageArgs, raw["sft"], "sft") if raw.get("sft") is not None else None
    evaluation = None
    if raw.get("evaluation") is not None:
        ev = raw["evaluation"]
        if not isinstance(ev, dict):
            raise RecipeError(f"`evaluation` must be a mapping, got {ev!r}.")
        ev = dict(ev)
        function = _check_value(ev.pop("function", DEFAULT_EVALUATION_FUNCTION), str, "evaluation.function")
        evaluation = EvaluationArgs(function=function, kwargs=ev)
    global_batch_size = raw.get("global_batch_size")
    if global_batch_size is not None:
        global_batch_size = _check_value(global_batch_size, int, "global_batch_size")
        if global_batch_size < 1:
            raise RecipeError(f"`global_batch_size` must be >= 1, got {global_batch_size}.")

    recipe = Recipe(
        method=method,
        output_dir=output_dir,
        model=model,
        data=data,
        generation=generation,
        training=dict(training),
        judge=judge,
        iterations=iterations,
        hub=hub,
        sft=sft,
        evaluation=evaluation,
        global_batch_size=global_batch_size,
        source=source,
        raw=raw,
    )
    _validate_semantics(recipe)
    return recipe


def _validate_semantics(r: Recipe) -> None:
    d, g = r.data, r.generation
    if (d.dataset_name is None) == (d.dataset_fn is None):
        raise RecipeError("Set exactly one of `data.dataset_name` (Hub id or local path) and `data.dataset_fn`.")
    if d.dataset_fn is not None:
        import_callable(d.dataset_fn, "data.dataset_fn")
    if r.model.build_fn is not None:
        import_callable(r.model.build_fn, "model.build_fn")
    needs_response = r.method in ("spin", "iris", "sft") or r.sft is not None
    if needs_response and not d.response_column:
        raise RecipeError(
            f"`data.response_column` is required for method {r.method!r}"
            f"{' and the sft stage' if r.sft is not None else ''}: the column holding the annotated response."
        )
    if d.num_prompts is not None and d.num_prompts < 1:
        raise RecipeError(f"`data.num_prompts` must be >= 1 or null (all prompts), got {d.num_prompts}.")
    if d.num_folds < 1:
        raise RecipeError(f"`data.num_folds` must be >= 1, got {d.num_folds}.")
    if d.num_prompts is not None and d.num_prompts < d.num_folds:
        raise RecipeError(
            f"`data.num_prompts` ({d.num_prompts}) is smaller than `data.num_folds` ({d.num_folds}): a fold would be "
            "empty."
        )
    if d.mix_previous_iterations is not None:
        if d.mix_previous_iterations < 0:
            raise RecipeError(f"`data.mix_previous_iterations` must be >= 0, got {d.mix_previous_iterations}.")
        if d.mix_previous_iterations > 0 and r.method not in ("spin", "iris"):
            raise RecipeError("`data.mix_previous_iterations` applies to spin and iris only; remove it.")
    if g.temperature < 0 or not 0 < g.top_p <= 1 or g.max_new_tokens < 1 or g.num_samples < 1:
        raise RecipeError(
            "`generation` needs temperature >= 0, 0 < top_p <= 1, max_new_tokens >= 1 and num_samples >= 1; got "
            f"temperature={g.temperature}, top_p={g.top_p}, max_new_tokens={g.max_new_tokens}, "
            f"num_samples={g.num_samples}."
        )
    if g.prompt_template is not None and "{prompt}" not in g.prompt_template:
        raise RecipeError(
            f"`generation.prompt_template` must contain '{{prompt}}', got {g.prompt_template!r}; "
            "or set it to null to use the chat template."
        )
    if r.method == "rspo":
        if g.num_samples < 2:
            raise RecipeError(
                f"`generation.num_samples` (K) must be >= 2 for rspo: preferences compare samples of the same "
                f"prompt (the paper uses 5); got {g.num_samples}."
            )
        if r.judge is None:
            raise RecipeError("rspo needs a `judge` section (type pairrm, or type function with `function`).")
        if r.judge.type == "function":
            if not r.judge.function:
                raise RecipeError("`judge.function` is required when `judge.type` is 'function' ('module:function').")
            import_callable(r.judge.function, "judge.function")
    elif g.num_samples != 1 and r.method in ("spin", "iris"):
        raise RecipeError(
            f"`generation.num_samples` must be 1 for {r.method}: one generated response is paired with each "
            f"annotated one; got {g.num_samples}."
        )
    if r.hub.push and not r.hub.model_id:
        raise RecipeError(
            "`hub.model_id` is required when `hub.push` is true (iteration t goes to <model_id>-iter<t>)."
        )
    if r.evaluation is not None:
        fn = import_callable(r.evaluation.function, "evaluation.function")
        params = inspect.signature(fn).parameters
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            for key in r.evaluation.kwargs:
                if key not in params:
                    raise RecipeError(
                        f"Unknown key `evaluation.{key}`: {r.evaluation.function} does not accept it."
                        f"{_suggest(str(key), params)}"
                    )


# ------------------------------------------------------------------------------------------- TRL configs


def config_class(method: str):
    """The TRL config class whose fields `training` holds for `method`."""
    try:
        if method == "spin":
            from trl_selfplay.trainers.spin import SPINConfig as cls
        elif method == "iris":
            from trl_selfplay.trainers.iris import IRISConfig as cls
        elif method == "rspo":
            from trl_selfplay.trainers.rspo import RSPOConfig as cls
        else:
            from trl import SFTConfig as cls
    except ImportError as error:  # pragma: no cover - only while the package is incomplete
        raise RecipeError(f"The {method} trainer cannot be imported: {error}.") from error
    return cls


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _config_field_types(cls) -> dict[str, Any]:
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # forward references TRL does not resolve: validate those fields by construction only
        hints = {}
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls) if f.init}


def _training_kwargs(method: str, training: dict[str, Any], prefix: str = "training") -> dict[str, Any]:
    """Recipe `training` → keyword arguments of the config class (types checked, `warmup_ratio` mapped)."""
    cls = config_class(method)
    types_ = _config_field_types(cls)
    kwargs: dict[str, Any] = {}
    for key, value in training.items():
        if key == "warmup_ratio":
            # transformers 5 removed `warmup_ratio`; a float in [0, 1) given as `warmup_steps` is a ratio.
            if "warmup_steps" in training:
                raise RecipeError(f"Set only one of `{prefix}.warmup_ratio` and `{prefix}.warmup_steps`.")
            ratio = _check_value(value, float, f"{prefix}.warmup_ratio")
            if not 0 <= ratio < 1:
                raise RecipeError(f"`{prefix}.warmup_ratio` must be in [0, 1), got {ratio}.")
            kwargs["warmup_steps"] = ratio
            continue
        if key == "output_dir":
            raise RecipeError(f"`{prefix}.output_dir` is set by the loop (<output_dir>/iter_<t>/); remove it.")
        if key not in types_:
            raise RecipeError(
                f"Unknown key `{prefix}.{key}`: not a field of {cls.__name__}.{_suggest(str(key), types_)}"
            )
        kwargs[key] = _check_value(value, types_[key], f"{prefix}.{key}")
    return kwargs


def build_training_config(
    method: str,
    training: dict[str, Any],
    output_dir: str,
    *,
    defaults: dict[str, Any] | None = None,
    prefix: str = "training",
    for_validation: bool = False,
):
    """Build the method's TRL config from a recipe's `training` mapping.

    `defaults` are the loop's own choices (e.g. `precompute_ref_log_probs=True`), used unless the recipe sets the
    field. Without a GPU, `bf16`/`fp16` default to off; a recipe that asks for them explicitly fails with a clear
    message, except when `for_validation` (dry-run), where mixed precision is switched off only to build the object.
    """
    cls = config_class(method)
    kwargs = {**(defaults or {}), **_training_kwargs(method, training, prefix)}
    cuda = _has_cuda()
    if not cuda:
        for flag in ("bf16", "fp16"):
            if flag not in training:
                kwargs[flag] = False
            elif training[flag] and not for_validation:
                raise RecipeError(
                    f"`{prefix}.{flag}: true` needs a GPU and none is available; pass --{prefix}.{flag}=false to run "
                    "on CPU."
                )
            elif for_validation:
                kwargs[flag] = False
    try:
        return cls(output_dir=output_dir, **kwargs)
    except (TypeError, ValueError) as error:
        raise RecipeError(f"`{prefix}` is not a valid {cls.__name__}: {error}") from error


def config_to_dict(config, training: dict[str, Any]) -> dict[str, Any]:
    """JSON-ready view of a TRL config; mixed-precision flags report the recipe's values."""
    out = json.loads(json.dumps(config.to_dict(), default=str))
    for flag in ("bf16", "fp16"):
        if flag in training:
            out[flag] = bool(training[flag])
    return out


def resolve_batch(recipe: Recipe, training: dict[str, Any], num_processes: int) -> dict[str, Any]:
    """Derive `gradient_accumulation_steps` from `global_batch_size` for this number of processes."""
    training = dict(training)
    if recipe.global_batch_size is None:
        return training
    if "gradient_accumulation_steps" in training:
        raise RecipeError("Set `global_batch_size` or `training.gradient_accumulation_steps`, not both.")
    per_device = int(training.get("per_device_train_batch_size", 8))
    denominator = per_device * num_processes
    if recipe.global_batch_size % denominator:
        raise RecipeError(
            f"`global_batch_size` {recipe.global_batch_size} is not a multiple of per_device_train_batch_size "
            f"({per_device}) × processes ({num_processes}); change one of them."
        )
    training["gradient_accumulation_steps"] = recipe.global_batch_size // denominator
    return training


def iteration_dir(output_dir: str | os.PathLike, t: int) -> Path:
    return Path(output_dir) / f"iter_{t}"


def start_model(recipe: Recipe, t: int) -> str:
    """The checkpoint iteration t starts from (π_t)."""
    if t > 0:
        return str(iteration_dir(recipe.output_dir, t - 1) / "model")
    if recipe.sft is not None:
        return str(Path(recipe.output_dir) / "sft" / "model")
    return recipe.model.name_or_path


def anchor_model(recipe: Recipe) -> str:
    """RSPO's anchor μ: `model.anchor_name_or_path`, else the checkpoint iteration 0 starts from."""
    return recipe.model.anchor_name_or_path or start_model(recipe, 0)


def needs_anchor_samples(recipe: Recipe) -> bool:
    """RSPO with the `forward_kl` regularizer on: the training data needs one sample from μ per prompt."""
    regularizers = recipe.training.get("regularizers") or {}
    if isinstance(regularizers, str):
        regularizers = json.loads(regularizers)
    return recipe.method == "rspo" and float(regularizers.get("forward_kl", 0.0)) > 0


def loop_training_defaults(method: str) -> dict[str, Any]:
    """The loop's defaults for the trainer config, overridable from the recipe."""
    defaults: dict[str, Any] = {"save_strategy": "no", "report_to": "none"}
    if method != "sft":
        # One pass of π_t over the data before training, so no reference model stays in memory.
        defaults["precompute_ref_log_probs"] = True
    return defaults


# --------------------------------------------------------------------------------------------- public API


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """`["--training.beta=5.0", "--data.num_prompts", "10"]` → nested dict with YAML-typed values."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise RecipeError(f"Overrides look like --section.key=value, got {arg!r}.")
        if "=" in arg:
            key, text = arg[2:].split("=", 1)
        else:
            if i + 1 >= len(args):
                raise RecipeError(f"Override {arg!r} has no value.")
            key, text = arg[2:], args[i + 1]
            i += 1
        i += 1
        try:
            value = yaml.safe_load(text) if text != "" else ""
        except yaml.YAMLError as error:
            raise RecipeError(f"Override --{key}: {text!r} is not a YAML value ({error}).") from error
        parts = key.split(".")
        node = out
        for depth, part in enumerate(parts[:-1]):
            # Iteration indices in `iterations.overrides.<t>` are integers, as YAML parses them.
            part_key: Any = int(part) if parts[:depth] == ["iterations", "overrides"] and part.isdigit() else part
            node = node.setdefault(part_key, {})
            if not isinstance(node, dict):
                raise RecipeError(f"Override --{key} conflicts with another override.")
        node[parts[-1]] = value
    return out


def load_recipe(path: str | os.PathLike, overrides: list[str] | dict[str, Any] | None = None) -> Recipe:
    """Read, override and validate a recipe file (every iteration resolved and its TRL config built)."""
    path = str(path)
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except FileNotFoundError:
        raise RecipeError(f"Recipe file not found: {path}.") from None
    except yaml.YAMLError as error:
        raise RecipeError(f"{path} is not valid YAML: {error}") from error
    if raw is None:
        raw = {}
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    if overrides:
        raw = _deep_merge(raw, overrides)
    return validate(raw, source=path)


def validate(raw: dict[str, Any], source: str = "<recipe>", num_processes: int = 1) -> Recipe:
    """Validate a raw recipe mapping completely: structure, every iteration's resolution and its TRL config."""
    try:
        recipe = _parse(raw, source)
        for t in range(recipe.iterations.count):
            it = recipe.for_iteration(t)
            training = resolve_batch(it, it.training, num_processes)
            build_training_config(
                it.method, training, "/tmp/trl-selfplay-validate", defaults=loop_training_defaults(it.method),
                for_validation=True,
            )  # fmt: skip
        if recipe.sft is not None:
            build_training_config(
                "sft", recipe.sft.training, "/tmp/trl-selfplay-validate", defaults=loop_training_defaults("sft"),
                prefix="sft.training", for_validation=True,
            )  # fmt: skip
    except RecipeError as error:
        raise RecipeError(f"{source}: {error}") from None
    return recipe


def dry_run(recipe: Recipe, num_processes: int = 1) -> list[dict[str, Any]]:
    """One JSON-ready record per iteration describing exactly what would run, without loading a model."""
    records = []
    for t in range(recipe.iterations.count):
        it = recipe.for_iteration(t)
        training = resolve_batch(it, it.training, num_processes)
        config = build_training_config(
            it.method,
            training,
            str(iteration_dir(it.output_dir, t) / "trainer"),
            defaults=loop_training_defaults(it.method),
            for_validation=True,
        )
        resolved = config_to_dict(config, training)
        resolved["num_processes"] = num_processes
        resolved["global_batch_size"] = (
            config.per_device_train_batch_size * config.gradient_accumulation_steps * num_processes
        )
        data = dataclasses.asdict(it.data)
        if data["mix_previous_iterations"] is None:
            data["mix_previous_iterations"] = 1 if it.method == "spin" else 0
        if it.method == "rspo":
            data["fold"] = t % it.data.num_folds
        record = {
            "recipe": recipe.source,
            "method": it.method,
            "iteration": t,
            "model": start_model(it, t),
            "training": resolved,
            "generation": dataclasses.asdict(it.generation) if it.method != "sft" else None,
            "data": data,
        }
        if it.method == "rspo":
            record["judge"] = dataclasses.asdict(it.judge)
            record["anchor"] = anchor_model(it)
            if needs_anchor_samples(it):  # forward_kl: where the samples from μ come from
                own = record["anchor"] == start_model(it, t)
                record["anchor_samples"] = "policy sample 0 (pi_t = mu)" if own else "1 per prompt generated by mu"
        if t == 0 and recipe.sft is not None:
            sft_config = build_training_config(
                "sft",
                recipe.sft.training,
                str(Path(recipe.output_dir) / "sft" / "trainer"),
                defaults=loop_training_defaults("sft"),
                prefix="sft.training",
                for_validation=True,
            )
            record["sft"] = {
                "num_examples": recipe.sft.num_examples,
                **config_to_dict(sft_config, recipe.sft.training),
            }
        records.append(record)
    return records
