"""Errors shared by the recipe parser, the method registry and the runner (a leaf module: imports nothing)."""


class RecipeError(ValueError):
    """A recipe (or a run directory it points at) is unusable; the message names the field and the fix."""
