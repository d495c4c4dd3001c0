"""Reading and validating recipes: YAML → `Recipe`, every iteration resolved and checked before any model loads."""

from __future__ import annotations

import copy
import importlib
import inspect
import os
import re
from typing import Any

import yaml

from trl_selfplay.errors import RecipeError
from trl_selfplay.methods import get_method, method_names
from trl_selfplay.recipes.configs import build_training_config, resolve_batch
from trl_selfplay.recipes.schema import (
    DEFAULT_EVALUATION_FUNCTION,
    OVERRIDABLE_SECTIONS,
    TOP_LEVEL_KEYS,
    DataArgs,
    EvaluationArgs,
    GenerationArgs,
    HubArgs,
    IterationsArgs,
    JudgeArgs,
    ModelArgs,
    Recipe,
    SFTStageArgs,
    build_section,
    check_value,
    suggest,
)


def deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in (update or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
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
            raise RecipeError(f"Unknown key `iterations.{key}`.{suggest(str(key), ['count', 'overrides'])}")
    count = check_value(value.get("count", 1), int, "iterations.count")
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
                    f"{list(OVERRIDABLE_SECTIONS)}.{suggest(str(section), OVERRIDABLE_SECTIONS)}"
                )
        overrides[t] = update
    return IterationsArgs(count=count, overrides=overrides)


def _parse(raw: dict[str, Any], source: str) -> Recipe:
    if not isinstance(raw, dict):
        raise RecipeError(f"{source}: a recipe must be a YAML mapping, got {type(raw).__name__}.")
    for key in raw:
        if key not in TOP_LEVEL_KEYS:
            raise RecipeError(
                f"Unknown key `{key}`.{suggest(str(key), TOP_LEVEL_KEYS)} Valid keys: {sorted(TOP_LEVEL_KEYS)}."
            )
    methods = method_names()
    if "method" not in raw:
        raise RecipeError(f"`method` is required: one of {list(methods)}.")
    method = raw["method"]
    if method not in methods:
        raise RecipeError(f"`method` must be one of {list(methods)}, got {method!r}.{suggest(str(method), methods)}")
    if "output_dir" not in raw:
        raise RecipeError("`output_dir` is required: the directory the iterations are written to.")
    output_dir = check_value(raw["output_dir"], str, "output_dir")
    if "model" not in raw:
        raise RecipeError("`model` is required, e.g. `model: {name_or_path: <Hub id or local path>}`.")
    model = build_section(ModelArgs, raw["model"], "model")
    if "data" not in raw:
        raise RecipeError("`data` is required, e.g. `data: {dataset_name: <Hub id or local path>}`.")
    data = build_section(DataArgs, raw["data"], "data")
    generation = build_section(GenerationArgs, raw.get("generation"), "generation")
    judge = build_section(JudgeArgs, raw["judge"], "judge") if raw.get("judge") is not None else None
    if judge is not None:  # the defaults that depend on the judge's type, resolved so the dry run shows them
        pairrm = judge.type == "pairrm"
        judge.mode = judge.mode or ("aggregate" if pairrm else "pairwise")
        judge.prompt_format = judge.prompt_format or ("chat_template" if pairrm else "raw")
    training = raw.get("training") or {}
    if not isinstance(training, dict):
        raise RecipeError(f"`training` must be a mapping of {method} config fields, got {training!r}.")
    iterations = _parse_iterations(raw.get("iterations"))
    hub = build_section(HubArgs, raw.get("hub"), "hub")
    sft = build_section(SFTStageArgs, raw["sft"], "sft") if raw.get("sft") is not None else None
    evaluation = None
    if raw.get("evaluation") is not None:
        ev = raw["evaluation"]
        if not isinstance(ev, dict):
            raise RecipeError(f"`evaluation` must be a mapping, got {ev!r}.")
        ev = dict(ev)
        function = check_value(ev.pop("function", DEFAULT_EVALUATION_FUNCTION), str, "evaluation.function")
        evaluation = EvaluationArgs(function=function, kwargs=ev)
    global_batch_size = raw.get("global_batch_size")
    if global_batch_size is not None:
        global_batch_size = check_value(global_batch_size, int, "global_batch_size")
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
    spec = get_method(r.method)
    d, g = r.data, r.generation
    if (d.dataset_name is None) == (d.dataset_fn is None):
        raise RecipeError("Set exactly one of `data.dataset_name` (Hub id or local path) and `data.dataset_fn`.")
    if d.dataset_fn is not None:
        import_callable(d.dataset_fn, "data.dataset_fn")
    if r.model.build_fn is not None:
        import_callable(r.model.build_fn, "model.build_fn")
    if (spec.needs_response or r.sft is not None) and not d.response_column:
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
        if d.mix_previous_iterations > 0 and spec.default_mix_previous_iterations is None:
            mixing = [n for n in method_names() if get_method(n).default_mix_previous_iterations is not None]
            raise RecipeError(f"`data.mix_previous_iterations` applies to {' and '.join(mixing)} only; remove it.")
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
    if spec.generates:
        if spec.distinct_samples and g.temperature == 0:
            raise RecipeError(
                f"`generation.temperature` is 0 (greedy decoding): the K samples of a prompt would all be identical, "
                f"but {r.method} pairs two different samples of each prompt ({spec.samples_reason}). Set "
                "`generation.temperature` > 0 (e.g. 0.7)."
            )
        if g.num_samples < spec.min_samples:
            raise RecipeError(
                f"`generation.num_samples` (K) must be >= {spec.min_samples} for {r.method}: {spec.samples_reason}; "
                f"got {g.num_samples}."
            )
        if spec.max_samples is not None and g.num_samples > spec.max_samples:
            raise RecipeError(
                f"`generation.num_samples` must be {spec.max_samples} for {r.method}: {spec.samples_reason}; got "
                f"{g.num_samples}."
            )
    if spec.needs_judge:
        if r.judge is None:
            raise RecipeError(f"{r.method} needs a `judge` section (type pairrm, or type function with `function`).")
        if r.judge.type == "function":
            if not r.judge.function:
                raise RecipeError("`judge.function` is required when `judge.type` is 'function' ('module:function').")
            import_callable(r.judge.function, "judge.function")
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
                        f"{suggest(str(key), params)}"
                    )


_NOT_A_VALID_CONFIG = re.compile(r"^`(?P<prefix>[\w.]+)` is not a valid (?P<cls>\w+): (?P<reason>.*)$", re.S)


def name_config_field(error: RecipeError, prefix: str, training: dict[str, Any], t: int | None) -> RecipeError:
    """A TRL config's own check names its field (`beta`); say it as the recipe field (`training.beta`), with the
    iteration when an `iterations.overrides` entry set it: "`training.beta` must be ... (SPINConfig, iteration 1)"."""
    match = _NOT_A_VALID_CONFIG.match(str(error))
    if match is None:
        return error
    reason = match["reason"]
    fields = sorted({name for name in re.findall(r"`(\w+)`", reason) if name in training})
    if not fields:
        return error
    for name in fields:
        reason = reason.replace(f"`{name}`", f"`{prefix}.{name}`")
    where = "" if t is None else f", iteration {t}"
    return RecipeError(f"{reason.rstrip('.')} ({match['cls']}{where}).")


def parse(raw: dict[str, Any], source: str = "<recipe>") -> Recipe:
    """Parse a raw recipe mapping and resolve it for every iteration (structure and semantics checked)."""
    recipe = _parse(raw, source)
    for t in range(recipe.iterations.count):
        resolved = _parse(deep_merge(copy.deepcopy(raw), recipe.iterations.overrides.get(t, {})), source)
        resolved.iteration, resolved.raw = t, raw
        recipe.resolved[t] = resolved
    return recipe


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
        raw = deep_merge(raw, overrides)
    return validate(raw, source=path)


def validate(raw: dict[str, Any], source: str = "<recipe>", num_processes: int = 1) -> Recipe:
    """Validate a raw recipe mapping completely: structure, every iteration's resolution and its TRL config."""
    try:
        recipe = parse(raw, source)
        for t in range(recipe.iterations.count):
            it = recipe.for_iteration(t)
            training = resolve_batch(it, it.training, num_processes)
            try:
                build_training_config(it.method, training, "/tmp/trl-selfplay-validate", for_validation=True)
            except RecipeError as error:
                raise name_config_field(
                    error, "training", training, t if t in recipe.iterations.overrides else None
                ) from None
        if recipe.sft is not None:
            try:
                build_training_config(
                    "sft", recipe.sft.training, "/tmp/trl-selfplay-validate", prefix="sft.training",
                    for_validation=True,
                )  # fmt: skip
            except RecipeError as error:
                raise name_config_field(error, "sft.training", recipe.sft.training, None) from None
    except RecipeError as error:
        raise RecipeError(f"{source}: {error}") from None
    return recipe
