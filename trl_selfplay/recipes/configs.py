"""A recipe's `training` mapping → the method's TRL config (types checked, the runner's defaults applied)."""

from __future__ import annotations

import dataclasses
import json
import typing
from typing import Any

from trl_selfplay.errors import RecipeError
from trl_selfplay.methods import get_method
from trl_selfplay.recipes.schema import Recipe, check_value, suggest


def config_class(method: str):
    """The TRL config class whose fields `training` holds for `method`."""
    return get_method(method).config_class()


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
            ratio = check_value(value, float, f"{prefix}.warmup_ratio")
            if not 0 <= ratio < 1:
                raise RecipeError(f"`{prefix}.warmup_ratio` must be in [0, 1), got {ratio}.")
            kwargs["warmup_steps"] = ratio
            continue
        if key == "output_dir":
            raise RecipeError(f"`{prefix}.output_dir` is set by the loop (<output_dir>/iter_<t>/); remove it.")
        if key not in types_:
            raise RecipeError(
                f"Unknown key `{prefix}.{key}`: not a field of {cls.__name__}.{suggest(str(key), types_)}"
            )
        kwargs[key] = check_value(value, types_[key], f"{prefix}.{key}")
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

    The method's runner defaults (`MethodSpec.default_training_config`, e.g. `precompute_ref_log_probs=True`) and
    `defaults` (choices known at run time, e.g. `model_init_kwargs`) apply unless the recipe sets the field. Without a GPU, `bf16`/`fp16` default to off; a recipe that asks for them explicitly fails with a clear
    message, except when `for_validation` (dry-run), where mixed precision is switched off only to build the object.
    """
    cls = config_class(method)
    kwargs = {
        **get_method(method).default_training_config(),
        **(defaults or {}),
        **_training_kwargs(method, training, prefix),
    }
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
