"""Checks of what a recipe points at, run before any model loads (and by `--dry-run`): local model paths, the
output directory, the Hub token, and the prompts every iteration will read. Each failure is one `RecipeError`
naming the recipe field and the fix.

Local path or Hub id: a Hub repository id is `name` or `org/name` (letters, digits, `-`, `_`, `.`). A value that
exists on disk is a local path; a value that does not exist and starts with `/`, `./`, `../` or `~`, has more than
one `/`, or is not shaped like a Hub id, is a local path that is missing. Anything else is taken as a Hub id, which
`from_pretrained` downloads; offline (`HF_HUB_OFFLINE=1`) a real run also requires it in the local Hub cache.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trl_selfplay.errors import RecipeError
from trl_selfplay.methods import get_method
from trl_selfplay.recipes import Recipe

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
_PATH_RULE = (
    "a Hub id is 'name' or 'org/name'; a value starting with '/', './', '../' or '~', or with more than one '/', "
    "is a local path"
)


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().upper() in {"1", "ON", "YES", "TRUE"}


def looks_like_local_path(value: str) -> bool:
    """True for a value that can only be a local path (see the module docstring), whether or not it exists."""
    return (
        value.startswith(("/", "./", "../", "~"))
        or value in (".", "..")
        or "\\" in value
        or value.count("/") > 1
        or not HUB_ID.match(value)
    )


def _model_fields(recipe: Recipe) -> list[tuple[str, str, str]]:
    """(field, value, how to fix it) of every model the run loads by name."""
    m = recipe.model
    fields = []
    if m.build_fn is None:
        fields.append(("model.name_or_path", m.name_or_path, "or set `model.build_fn` to build it there"))
    if m.anchor_name_or_path:
        fields.append(("model.anchor_name_or_path", m.anchor_name_or_path, "or null for the start model"))
    seen = set()
    for t in range(recipe.iterations.count):
        r = recipe.for_iteration(t)
        if get_method(r.method).needs_judge and r.judge is not None and r.judge.type == "pairrm":
            if r.judge.model_name_or_path not in seen:
                seen.add(r.judge.model_name_or_path)
                fields.append(("judge.model_name_or_path", r.judge.model_name_or_path, "e.g. llm-blender/PairRM"))
    return fields


def _in_hub_cache(repo_id: str, revision: str | None) -> bool:
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(repo_id, revision=revision, local_files_only=True)
    except Exception:
        return False
    return True


def check_model_paths(recipe: Recipe, dry_run: bool = False) -> None:
    """A local model / anchor / PairRM path that does not exist; offline (real runs), a Hub id not in the cache."""
    for name, value, fix in _model_fields(recipe):
        if os.path.exists(os.path.expanduser(value)):
            continue
        if looks_like_local_path(value):
            raise RecipeError(
                f"`{name}` is {value!r}, a local path ({_PATH_RULE}), but it does not exist. Fix the path, {fix}."
            )
        revision = recipe.model.revision if value == recipe.model.name_or_path else None
        if not dry_run and hub_offline() and not _in_hub_cache(value, revision):
            raise RecipeError(
                f"`{name}` is {value!r}, a Hub id ({_PATH_RULE}), but HF_HUB_OFFLINE is set and it is not in the "
                f"local Hub cache. Download it first (`hf download {value}`), unset HF_HUB_OFFLINE, or give a local "
                "path."
            )


def check_output_dir(recipe: Recipe) -> None:
    """`output_dir` exists as a writable directory, or can be created (its nearest existing parent is one)."""
    path = Path(recipe.output_dir).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise RecipeError(f"`output_dir` {path} is a file, not a directory; pass --output_dir=<a directory>.")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise RecipeError(
            f"`output_dir` {path} cannot be created: {existing} is a file. Pass --output_dir=<a directory>."
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "is not writable" if existing == path else f"cannot be created: {existing} is not writable"
        raise RecipeError(
            f"`output_dir` {path} {what} by this user. Pass --output_dir=<a writable directory> or fix the "
            "permissions."
        )


def check_hub(recipe: Recipe, api: Any = None) -> None:
    """`hub.push: true` needs a token the Hub accepts (`whoami`), checked now rather than after iteration 0 trained."""
    if not recipe.hub.push:
        return
    if api is None and hub_offline():
        raise RecipeError(
            "`hub.push` is true, but HF_HUB_OFFLINE is set: the Hub token cannot be checked (and nothing can be "
            "pushed) offline. Unset HF_HUB_OFFLINE, or pass --hub.push=false and push later by rerunning with "
            "--hub.push=true."
        )
    if api is None:
        from huggingface_hub import HfApi, get_token

        if get_token() is None:
            raise RecipeError(
                "`hub.push` is true, but no Hub token is set. Log in with `hf auth login` or set HF_TOKEN (a token "
                "with write access), or pass --hub.push=false."
            )
        api = HfApi()
    try:
        user = api.whoami()
    except Exception as error:
        raise RecipeError(
            f"`hub.push` is true, but the Hub token is not usable ({type(error).__name__}: {error}). Log in with "
            "`hf auth login` or set HF_TOKEN, or pass --hub.push=false."
        ) from None
    if not user:
        raise RecipeError(
            "`hub.push` is true, but the Hub does not recognise the token. Log in with `hf auth login` or set "
            "HF_TOKEN, or pass --hub.push=false."
        )


def check_prompts(recipe: Recipe, dataset_for: Callable[[Recipe], Any]) -> None:
    """Every iteration has at least one prompt (a fold can be empty when `data.num_folds` exceeds the prompts) and
    its prompts (and annotated responses) are readable. `dataset_for(resolved recipe)` is the loaded dataset, or
    None when it is not loaded (a Hub dataset in `--dry-run`)."""
    from trl_selfplay.runner.data import iteration_examples

    for t in range(recipe.iterations.count):
        r = recipe.for_iteration(t)
        dataset = dataset_for(r)
        if dataset is None:
            continue
        if not iteration_examples(dataset, r, t):
            d = r.data
            available = len(dataset) if d.num_prompts is None else min(d.num_prompts, len(dataset))
            raise RecipeError(
                f"Iteration {t} has no prompt: {available} prompt(s) (`data.num_prompts`: {d.num_prompts}, dataset "
                f"rows: {len(dataset)}) split into `data.num_folds` = {d.num_folds} folds. Lower `data.num_folds` "
                f"to at most {max(available, 1)} or use more prompts."
            )


def check_recipe_data(recipe: Recipe, load_remote: bool = True) -> None:
    """Load every dataset the run reads (the run's and each iteration's `data` overrides; Hub datasets only if
    `load_remote`) and check its columns, rows and the prompts of every iteration (`check_prompts`)."""
    from trl_selfplay.runner.data import check_data, source_key

    loaded: dict[str, Any] = {}
    for r in [recipe, *recipe.resolved.values()]:
        if source_key(r) not in loaded:
            loaded[source_key(r)] = check_data(r, load_remote=load_remote)
    check_prompts(recipe, lambda r: loaded[source_key(r)])


def check_environment(recipe: Recipe, dry_run: bool = False, hub_api: Any = None) -> None:
    """The checks that need no dataset and no model, in the order a user would fix them."""
    check_model_paths(recipe, dry_run=dry_run)
    check_output_dir(recipe)
    check_hub(recipe, api=hub_api)
