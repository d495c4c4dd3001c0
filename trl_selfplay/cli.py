"""`trl-selfplay` / `scripts/run.py`: run one or several recipe files in turn.

    accelerate launch scripts/run.py recipes/spin/zephyr-7b-sft-full.yaml [--training.learning_rate=1e-7 ...]
    trl-selfplay --dry-run recipes/rspo/*.yaml

Every recipe is validated before the first one starts, so a typo in the last file fails in seconds, not after days.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field

USAGE = """usage: trl-selfplay [--dry-run] [--num-processes N] [--restart-from STAGE[@T]] RECIPE.yaml [RECIPE.yaml ...]
                    [--section.key=value ...]

Runs each self-play recipe in turn (resuming finished stages of an existing output_dir).

  --dry-run           validate every recipe and print one JSON line per iteration; no model is loaded (a local
                      dataset is opened to check its columns and prompts; local model paths, output_dir and, with
                      hub.push, the Hub token are checked)
  --num-processes N   processes assumed by --dry-run for the global batch size (default: $WORLD_SIZE or 1)
  --restart-from STAGE[@T]
                      move the outputs of STAGE of iteration T and of every later stage to <output_dir>/discarded/
                      and compute them again (after changing the recipe, or to regenerate a damaged file). STAGE@T:
                      generate, anchor_generations, judge, pairs, train, evaluate or summary of iteration T;
                      or sft / initial_eval. One recipe only.
  --section.key=value override any recipe field, value parsed as YAML (e.g. --training.beta=5.0,
                      --iterations.count=2, --iterations.overrides.3.training.beta=5.0); applies to every recipe

Exit status: 0 done, 2 a recipe, its data or its output_dir cannot be used (one line starting with "error:" says
which field or file, and the fix).
"""


@dataclass
class Arguments:
    recipes: list[str] = field(default_factory=list)
    overrides: list[str] = field(default_factory=list)
    dry_run: bool = False
    num_processes: int | None = None
    restart_from: str | None = None


def _value(argv: list[str], i: int, flag: str) -> tuple[str, int]:
    """The value of `--flag=value` or `--flag value` at argv[i], and the index of the last argument used."""
    if "=" in argv[i]:
        return argv[i].split("=", 1)[1], i
    if i + 1 >= len(argv):
        raise SystemExit(f"{flag} needs a value")
    return argv[i + 1], i + 1


def _parse_args(argv: list[str]) -> Arguments:
    args = Arguments()
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            print(USAGE)
            raise SystemExit(0)
        if arg == "--dry-run":
            args.dry_run = True
        elif arg == "--num-processes" or arg.startswith("--num-processes="):
            value, i = _value(argv, i, "--num-processes")
            args.num_processes = int(value)
        elif arg == "--restart-from" or arg.startswith("--restart-from="):
            args.restart_from, i = _value(argv, i, "--restart-from")
        elif arg.startswith("--"):
            args.overrides.append(arg)
            if "=" not in arg:
                i += 1
                if i >= len(argv):
                    raise SystemExit(f"override {arg} needs a value")
                args.overrides.append(argv[i])
        else:
            args.recipes.append(arg)
        i += 1
    return args


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0


def main(argv: list[str] | None = None) -> int:
    from trl_selfplay.recipes import RecipeError, dry_run, load_recipe

    args = _parse_args(list(sys.argv[1:] if argv is None else argv))
    if not args.recipes:
        print(USAGE, file=sys.stderr)
        return 2
    num_processes = int(os.environ.get("WORLD_SIZE", "1")) if args.num_processes is None else args.num_processes
    if not args.dry_run:
        from trl_selfplay.runner import setup_distributed

        # Before anything (validation builds TRL configs) initialises accelerate's state.
        setup_distributed()
    try:
        recipes = [load_recipe(path, args.overrides) for path in args.recipes]
        if args.restart_from is not None:
            from trl_selfplay.runner.manifest import parse_restart

            if len(recipes) > 1:
                raise RecipeError("--restart-from applies to one recipe: pass a single RECIPE.yaml with it.")
            parse_restart(args.restart_from, recipes[0])
        from trl_selfplay.runner import SelfPlayRunner, check_environment, check_recipe_data

        # Every recipe is checked before the first starts: its local data (Hub datasets when the recipe starts),
        # then what a run needs of this machine and what the recipe points at (paths, output_dir, Hub token).
        for recipe in recipes:
            check_recipe_data(recipe, load_remote=False)
        for recipe in recipes:
            if args.dry_run:
                check_environment(recipe, dry_run=True)
            else:
                SelfPlayRunner(recipe).preflight()
        if args.dry_run:
            for recipe in recipes:
                for record in dry_run(recipe, num_processes=num_processes):
                    if _is_main_process():
                        print(json.dumps(record, default=str), flush=True)
            return 0
    except RecipeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    from trl_selfplay.runner import run_recipe, shutdown_distributed

    for recipe in recipes:
        try:
            run_recipe(recipe, restart_from=args.restart_from)
        except RecipeError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    shutdown_distributed()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
