"""Where a run's models live: the iteration directories, the model iteration t starts from, and RSPO's anchor."""

from __future__ import annotations

import os
from pathlib import Path

from trl_selfplay.recipes.schema import Recipe


def iteration_dir(output_dir: str | os.PathLike, t: int) -> Path:
    return Path(output_dir) / f"iter_{t}"


def sft_dir(output_dir: str | os.PathLike) -> Path:
    """The optional SFT warm start, before iteration 0."""
    return Path(output_dir) / "sft"


def start_model(recipe: Recipe, t: int) -> str:
    """The checkpoint iteration t starts from (π_t)."""
    if t > 0:
        return str(iteration_dir(recipe.output_dir, t - 1) / "model")
    if recipe.sft is not None:
        return str(sft_dir(recipe.output_dir) / "model")
    return recipe.model.name_or_path


def anchor_model(recipe: Recipe) -> str:
    """The fixed anchor μ (RSPO): `model.anchor_name_or_path`, else the checkpoint iteration 0 starts from."""
    return recipe.model.anchor_name_or_path or start_model(recipe, 0)
