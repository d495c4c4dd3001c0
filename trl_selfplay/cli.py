"""`trl-selfplay` / `scripts/run.py`: run one or several recipe files in turn.

    accelerate launch scripts/run.py recipes/spin/zephyr-7b-sft-full.yaml [--training.learning_rate=1e-7 ...]
    trl-selfplay --dry-run recipes/rspo/*.yaml

Every recipe is validated before the first one starts, so a typo in the last file fails in seconds, not after days.
"""

from __future__ import annotations

import json
import os
import sys

USAGE = """usage: trl-selfplay [--dry-run] [--num-processes N] RECIPE.yaml [RECIPE.yaml ...] [--section.key=value ...]

Runs each self-play recipe in turn (resuming finished stages of an existing output_dir).

  --dry-run           validate every recipe and print one JSON line per iteration; no model or data is loaded
                      (a local dataset is opened to check its columns)
  --num-processes N   processes assumed by --dry-run for the global batch size (default: $WORLD_SIZE or 1)
  --section.key=value override any recipe field, value parsed as YAML (e.g. --training.beta=5.0,
                      --iterations.count=2, --iterations.overrides.3.training.beta=5.0); applies to every recipe
"""


def _parse_args(argv: list[str]) -> tuple[list[str], list[str], bool, int | None]:
    recipes: list[str] = []
    overrides: list[str] = []
    dry_run = False
    num_processes: int | None = None
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            print(USAGE)
            raise SystemExit(0)
        if arg == "--dry-run":
            dry_run = True
        elif arg == "--num-processes" or arg.startswith("--num-processes="):
            if "=" in arg:
                value = arg.split("=", 1)[1]
            else:
                i += 1
                if i >= len(argv):
                    raise SystemExit("--num-processes needs a value")
                value = argv[i]
            num_processes = int(value)
        elif arg.startswith("--"):
            overrides.append(arg)
            if "=" not in arg:
                i += 1
                if i >= len(argv):
                    raise SystemExit(f"override {arg} needs a value")
                overrides.append(argv[i])
        else:
            recipes.append(arg)
        i += 1
    return recipes, overrides, dry_run, num_processes


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0


def main(argv: list[str] | None = None) -> int:
    from trl_selfplay.recipes import RecipeError, dry_run, load_recipe

    argv = list(sys.argv[1:] if argv is None else argv)
    recipe_paths, overrides, is_dry_run, num_processes = _parse_args(argv)
    if not recipe_paths:
        print(USAGE, file=sys.stderr)
        return 2
    if num_processes is None:
        num_processes = int(os.environ.get("WORLD_SIZE", "1"))
    if not is_dry_run:
        from trl_selfplay.loop import setup_distributed

        # Before anything (validation builds TRL configs) initialises accelerate's state.
        setup_distributed()
    try:
        recipes = [load_recipe(path, overrides) for path in recipe_paths]
        from trl_selfplay.loop import check_data

        for recipe in recipes:  # local datasets are checked now; Hub datasets when their recipe starts
            check_data(recipe, load_remote=False)
        if is_dry_run:
            for recipe in recipes:
                for record in dry_run(recipe, num_processes=num_processes):
                    if _is_main_process():
                        print(json.dumps(record, default=str), flush=True)
            return 0
    except RecipeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    from trl_selfplay.loop import run_recipe, shutdown_distributed

    for recipe in recipes:
        try:
            run_recipe(recipe)
        except RecipeError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    shutdown_distributed()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
