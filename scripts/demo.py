"""`make demo`: self-play on CPU, offline, in a few minutes — 2-digit addition learned by a tiny model from scratch.

Builds the warm start every recipe starts from (`model.build_fn` of the recipes: a ~0.72M-parameter Qwen2 with a
character tokenizer, trained with SFT from scratch until it gets 40% of the validation sums right), then runs the
recipes of `recipes/demo/` through the real runner (`trl_selfplay.cli.main`, the same code as `scripts/run.py`):

    00_sft.yaml    continued SFT for the same steps as the self-play recipes (the baseline of the SPIN and IRIS
                   papers)
    10_spin.yaml   SPIN + NLL      20_iris.yaml   IRIS (adaptive α) + NLL      30_rspo.yaml   RSPO (programmatic judge)

The recipes run in `--jobs` processes at once (default 2, one per core), each with one torch thread: a model this
small gains nothing from a second thread (measured: 150 warm-start steps took 20 s on one thread, 76 s on two, on
this 2-core machine while other work ran), so two processes use two cores better than one process with two threads.

The terminal gets one line per stage with its wall time (and one progress bar while a stage runs, on a terminal),
then the per-iteration table (held-out exact-match accuracy, win rate against the previous iteration, response
length, self-BLEU, reward margin, IRIS α and gap) and the plot paths. Everything else — the runner's
`[trl-selfplay]` lines, the trainers' logs, library warnings — goes to one log file per stage in
`<output-root>/logs/<date>-<time>/`, the directory the second line names.

    python scripts/demo.py                      # the full demo, into runs/demo/
    python scripts/demo.py --seed 1             # another warm start, other prompts, sampling and data order
    python scripts/demo.py --quick --output-root /tmp/demo   # 1 short iteration per recipe (what the tests run)
    python scripts/demo.py --verbose --jobs 1   # everything on the terminal, no log files
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TextIO

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))
DEMO_RECIPES = REPO / "recipes" / "demo"
DEFAULT_ROOT = "runs/demo"

# --quick: the whole pipeline (warm start, every method, evaluation, plots) on a few examples.
QUICK_OVERRIDES = [
    "--iterations.count=1",
    "--data.num_prompts=32",
    "--training.max_steps=2",
    "--evaluation.task_kwargs.num_eval=16",
    "--evaluation.diversity_prompts=4",
]
QUICK_WARM_START = {"max_steps": 4, "num_validation": 16, "eval_steps": 2}

# What `--seed` sets in every recipe (the warm start's seed is passed to its build function).
SEED_KEYS = ("training.seed", "generation.seed", "data.seed")

# Row labels of the summary table and stage lines, by the recipe's method.
LABELS = {"sft": "continued SFT", "spin": "SPIN + NLL", "iris": "IRIS + NLL", "rspo": "RSPO"}
# Relative cost of a recipe, to split them between processes (measured CPU time of the demo recipes, seed 0).
COST = {"sft": 1.0, "spin": 2.5, "iris": 2.7, "rspo": 5.0}


def _setup_environment(threads: int) -> None:
    # Offline, and no library progress bars (tqdm reads TQDM_DISABLE), before transformers/datasets are imported.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ["TQDM_DISABLE"] = "1"
    os.environ["OMP_NUM_THREADS"] = str(threads)  # inherited by the worker processes
    import datasets
    import torch
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    datasets.logging.set_verbosity_warning()
    transformers.logging.set_verbosity_warning()
    torch.set_num_threads(threads)


def _load_yaml(recipe: Path) -> dict:
    import yaml

    with open(recipe) as f:
        return yaml.safe_load(f)


def _under_root(value: str, root: str) -> str:
    return root + value[len(DEFAULT_ROOT) :] if value.startswith(DEFAULT_ROOT) else value


def _recipe_overrides(recipe: Path, root: str, quick: bool) -> list[str]:
    """Per-recipe overrides: move every path under `root` (so a test can run the demo in a temporary directory)."""
    raw = _load_yaml(recipe)
    overrides = []
    for key, value in (("output_dir", raw.get("output_dir")), ("model.name_or_path", raw["model"]["name_or_path"])):
        if isinstance(value, str) and value.startswith(DEFAULT_ROOT) and root != DEFAULT_ROOT:
            overrides.append(f"--{key}={_under_root(value, root)}")
    if quick:
        overrides += QUICK_OVERRIDES
    return overrides


class _Console:
    """The real terminal, kept while file descriptors 1 and 2 — so `print`, warnings, logging handlers and C
    extensions alike — are pointed at a log file (`redirect`). Not `quiet`: nothing is redirected."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        sys.stdout.flush()
        self.stream: TextIO = os.fdopen(os.dup(1), "w", buffering=1) if quiet else sys.stdout

    def write(self, line: str = "") -> None:
        from tqdm import tqdm

        tqdm.write(line, file=self.stream)  # above a progress bar, if one is drawn

    def progress(self, total: int | None, desc: str):
        """A progress bar on the terminal (only on an interactive one), or a stand-in that draws nothing."""
        from tqdm import tqdm

        interactive = self.stream.isatty()
        return tqdm(total=total, desc=desc, file=self.stream, leave=False, disable=not interactive, unit="it")

    @contextlib.contextmanager
    def redirect(self, path: Path):
        if not self.quiet:
            yield
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        sys.stdout.flush()
        sys.stderr.flush()
        saved = (os.dup(1), os.dup(2))
        with open(path, "a") as log:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
        try:
            yield
        except BaseException:
            if sys.exc_info()[0] is not SystemExit:
                import traceback

                traceback.print_exc()  # into the log, after everything that led to it
            raise
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, saved_fd in zip((1, 2), saved):
                os.dup2(saved_fd, fd)
                os.close(saved_fd)


def _stage_line(label: str, seconds: float, detail: str = "") -> str:
    return f"  {label:<42} {seconds:6.0f}s" + (f"   {detail}" if detail else "")


def _warm_start_progress(bar):
    """A trainer callback that moves the warm start's progress bar (its total: the step cap; it stops earlier)."""
    from transformers import TrainerCallback

    class WarmStartProgress(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            bar.reset(total=state.max_steps)

        def on_step_end(self, args, state, control, **kwargs):
            bar.update(state.global_step - bar.n)

    return WarmStartProgress()


def _build_start_models(recipes: list[Path], args, console: _Console, log_dir: Path) -> None:
    """Build each start model a recipe's `model.build_fn` names (once, before the runs, so its time is a stage line of
    its own); the runner then finds it in place."""
    from trl_selfplay.recipes import import_callable

    built = set()
    for recipe in recipes:
        raw = _load_yaml(recipe)
        if not raw["model"].get("build_fn"):
            continue
        path = Path(_under_root(raw["model"]["name_or_path"], args.output_root))
        if path in built:
            continue
        built.add(path)
        if path.exists():
            console.write(_stage_line("warm start: reused", 0.0, str(path)))
            continue
        build = import_callable(raw["model"]["build_fn"], "model.build_fn")
        kwargs = {"seed": args.seed or 0, **(QUICK_WARM_START if args.quick else {})}
        t0 = time.perf_counter()
        with console.progress(None, "warm start") as bar, console.redirect(log_dir / "warm-start.log"):
            build(path, callbacks=[_warm_start_progress(bar)], **kwargs)
        console.write(_stage_line("warm start: SFT from scratch", time.perf_counter() - t0, _warm_start_info(path)))


def _warm_start_info(path: Path) -> str:
    info = path / "warm_start.json"
    if not info.exists():
        return ""
    with open(info) as f:
        record = json.load(f)
    reached = "" if record["reached_target"] else f" (target {record['target_accuracy']:.2f} not reached)"
    return f"{record['steps']} steps, validation accuracy {record['validation_accuracy']:.2f}{reached}"


def _lanes(recipes: list[Path], jobs: int) -> list[list[Path]]:
    """Split the recipes between `jobs` processes, most expensive first onto the least loaded (order kept within a
    process)."""
    lanes: list[list[Path]] = [[] for _ in range(max(1, min(jobs, len(recipes))))]
    loads = [0.0] * len(lanes)
    for recipe in sorted(recipes, key=lambda r: -COST.get(_load_yaml(r)["method"], 1.0)):
        i = loads.index(min(loads))
        lanes[i].append(recipe)
        loads[i] += COST.get(_load_yaml(recipe)["method"], 1.0)
    return [sorted(lane) for lane in lanes if lane]


def _worker(args, extra: list[str], log_dir: Path, status: Path) -> int:
    """Run `args.recipes` one after another, each with its own log file; append one status line per recipe."""
    from trl_selfplay.cli import main as run_main

    console = _Console(quiet=not args.verbose)
    for recipe in map(Path, args.recipes):
        t0 = time.perf_counter()
        with console.redirect(log_dir / f"{recipe.stem}.log"):
            code = run_main([str(recipe), *_recipe_overrides(recipe, args.output_root, args.quick), *extra])
        with open(status, "a") as f:
            f.write(json.dumps({"recipe": recipe.name, "seconds": time.perf_counter() - t0, "code": code}) + "\n")
        if code:
            return code
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-root", default=DEFAULT_ROOT, help="where the runs go (default: runs/demo)")
    parser.add_argument("--quick", action="store_true", help="1 short iteration per recipe, a few examples")
    parser.add_argument("--recipes", nargs="*", help="recipe files (default: recipes/demo/*.yaml, in name order)")
    parser.add_argument("--jobs", type=int, default=2, help="recipes run at once, in that many processes (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per process (default 1)")
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seed of the warm start and of every recipe's sampling, training and prompt order (default: the recipes')",
    )
    parser.add_argument("--log-dir", default=None, help="default: <output-root>/logs/<date>-<time>/")
    parser.add_argument("--verbose", action="store_true", help="everything on the terminal, no log files")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: status file of a worker process
    parser.add_argument("extra", nargs="*", help="further --section.key=value overrides (with '=') for every recipe")
    return parser


def main(argv: list[str] | None = None) -> int:
    args, unknown = _parser().parse_known_args(argv)
    passthrough = list(args.extra) + unknown
    seeds = [] if args.seed is None else [f"--{key}={args.seed}" for key in SEED_KEYS]
    _setup_environment(args.threads)
    os.chdir(REPO)  # recipes use repository-relative paths
    log_dir = Path(args.log_dir or Path(args.output_root) / "logs" / time.strftime("%Y%m%d-%H%M%S"))
    if args.worker is not None:
        return _worker(args, seeds + passthrough, log_dir, Path(args.worker))

    recipes = [Path(p) for p in args.recipes] if args.recipes else sorted(DEMO_RECIPES.glob("*.yaml"))
    if not recipes:
        raise SystemExit(f"No recipes found in {DEMO_RECIPES}.")
    console = _Console(quiet=not args.verbose)
    start = time.perf_counter()
    console.write("trl-selfplay demo: 2-digit addition on CPU, offline" + (" (--quick)" if args.quick else ""))
    if console.quiet:
        console.write(f"  logs: {log_dir}/ (one file per stage)")
    _build_start_models(recipes, args, console, log_dir)
    code = _run_recipes(recipes, args, passthrough, log_dir, console)
    if code:
        return code
    _report(recipes, args.output_root, console)
    console.write(f"total {time.perf_counter() - start:.0f}s")
    return 0


def _run_recipes(recipes: list[Path], args, passthrough: list[str], log_dir: Path, console: _Console) -> int:
    """Start one worker process per lane, and follow them: a stage line per finished recipe, one progress bar over
    every recipe's evaluated models (the start model and each iteration: one line of its metrics.jsonl each)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    raws = {recipe.name: _load_yaml(recipe) for recipe in recipes}
    count = {
        name: 1 if args.quick else int((raw.get("iterations") or {}).get("count", 1)) for name, raw in raws.items()
    }
    common = ["--output-root", args.output_root, "--threads", str(args.threads), "--log-dir", str(log_dir)]
    common += (["--quick"] if args.quick else []) + (["--verbose"] if args.verbose else [])
    common += [] if args.seed is None else ["--seed", str(args.seed)]
    workers = []
    lanes = _lanes(recipes, args.jobs)
    for i, lane in enumerate(lanes):
        status = log_dir / f".worker{i}.jsonl"
        status.unlink(missing_ok=True)
        command = [sys.executable, str(Path(__file__).resolve()), *common, "--worker", str(status)]
        command += ["--recipes", *map(str, lane), *passthrough]
        # A worker writes each recipe's output to that recipe's log; anything outside a recipe goes to its own log.
        out = None if args.verbose else open(log_dir / f"worker{i}.log", "a")
        workers.append((subprocess.Popen(command, cwd=REPO, stdout=out, stderr=out), status))
        if out is not None:
            out.close()

    seen: set[str] = set()
    failed = None
    with console.progress(sum(n + 1 for n in count.values()), "self-play runs") as bar:
        while True:
            running = any(process.poll() is None for process, _ in workers)
            for _, status in workers:
                for line in status.read_text().splitlines() if status.exists() else []:
                    record = json.loads(line)
                    if record["recipe"] in seen:
                        continue
                    seen.add(record["recipe"])
                    raw = raws[record["recipe"]]
                    n = count[record["recipe"]]
                    label = f"{LABELS.get(raw['method'], raw['method'])}: {n} iteration{'s' * (n > 1)}"
                    console.write(_stage_line(label, record["seconds"]))
                    if record["code"] and failed is None:
                        failed = (record["recipe"], record["code"])
            done = sum(
                min(
                    _count_lines(Path(_under_root(raw["output_dir"], args.output_root)) / "metrics.jsonl"),
                    count[n] + 1,
                )
                for n, raw in raws.items()
            )
            bar.update(done - bar.n)
            if not running:
                break
            time.sleep(0.5)
    if failed is None:  # a worker that died without reporting: its first recipe without a status line
        for (process, _), lane in zip(workers, lanes):
            if process.returncode:
                failed = (next((r.name for r in lane if r.name not in seen), lane[-1].name), process.returncode)
                break
    if failed is not None:
        name, code = failed
        console.write(f"  {name} failed (exit code {code}); see {log_dir / Path(name).stem}.log")
        return code or 1
    return 0


def _count_lines(path: Path) -> int:
    try:
        with open(path) as f:
            return sum(1 for line in f if line.strip())
    except FileNotFoundError:
        return 0


def _report(recipes: list[Path], root: str, console: _Console) -> None:
    """The per-iteration table (the warm start once, then each method's iterations) and the plots."""
    from trl_selfplay.evaluation import format_summary_table, read_metrics
    from trl_selfplay.plotting import plot_runs

    runs, pngs = {}, []
    for recipe in recipes:
        raw = _load_yaml(recipe)
        run_dir = Path(_under_root(raw["output_dir"], root))
        if (run_dir / "metrics.jsonl").exists():
            runs[LABELS.get(raw["method"], raw["method"])] = read_metrics(run_dir)
            pngs.append(run_dir / "metrics.png")  # drawn by the runner at the end of its run
    if not runs:
        return
    overlay = plot_runs(runs, Path(root) / "comparison.png", title="demo: 2-digit addition")
    # Every recipe starts from the same warm start: its line (iteration -1) is shown once.
    first = next(iter(runs.values()))
    starts = [line for line in first if line.get("iteration") == -1]
    table = {
        "warm start": starts,
        **{name: [x for x in lines if x.get("iteration") != -1] for name, lines in runs.items()},
    }
    count = next((line["eval"].get("num_eval_prompts") for line in first if line.get("eval")), None)
    console.write(
        f"\n{count} held-out sums, never trained on nor used for any choice (accuracy: exact match, greedy):"
    )
    console.write("\n" + format_summary_table(table))
    console.write(f"\nplots: {overlay}\n       " + "\n       ".join(map(str, pngs)))


if __name__ == "__main__":
    raise SystemExit(main())
