"""The multi-iteration runner: one validated recipe in, one checkpoint per iteration out (docs/pipeline.md).

    for t in iterations:  generate → (anchor samples) → judge → pairs → train (reference pass first) → evaluate
                          → summary → card → push

Every output is written under a temporary name and renamed, and a stage is done only once its manifest is written
after all of its outputs (`trl_selfplay.runner.manifest`): rerunning the same command after a crash resumes at the
first unfinished stage. Before any work, a run takes the directory's lock (one run per `output_dir`) and checks every
finished stage against the recipe and its recorded files; a mismatch stops it with the field or file named.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import tempfile
import time
from typing import Any

import yaml

from trl_selfplay.errors import RecipeError
from trl_selfplay.methods import get_method
from trl_selfplay.recipes import Recipe, build_training_config, import_callable, iteration_dir, resolve_batch
from trl_selfplay.runner import stages
from trl_selfplay.runner.checks import check_environment, check_prompts
from trl_selfplay.runner.context import Iteration, RunContext
from trl_selfplay.runner.data import iteration_examples
from trl_selfplay.runner.distributed import barrier, is_main, on_main, setup_distributed
from trl_selfplay.runner.io import read_json, write_json, write_jsonl, write_text
from trl_selfplay.runner.lock import RunLock
from trl_selfplay.runner.manifest import parse_restart, stage_label


class SelfPlayRunner:
    """Runs a validated recipe, resuming from whatever `output_dir` already holds.

    `restart_from` (`"<stage>@<t>"`, or `"sft"` / `"initial_eval"`) first moves that stage's outputs and every later
    one to `<output_dir>/discarded/<time>/`, so they are computed again (the CLI's `--restart-from`).
    """

    def __init__(self, recipe: Recipe, hub_api: Any = None, restart_from: str | None = None):
        self.run_ctx = RunContext(recipe, hub_api=hub_api)
        self.restart = parse_restart(restart_from, recipe) if restart_from else None
        self._lock = RunLock(self.run_ctx.output_dir)

    def run(self) -> None:
        ctx, r = self.run_ctx, self.run_ctx.recipe
        setup_distributed()
        self.preflight()
        on_main(self._claim_output_dir)
        try:
            ctx.load_datasets()
            check_prompts(r, ctx.dataset)
            if is_main():
                self._collect_metrics()  # e.g. a crash between an iteration's metrics.json and metrics.jsonl
            barrier()
            self._build_start_model()
            if r.sft is not None:
                stages.warm_start(ctx)
            if r.evaluation is not None:
                self._evaluate_start_model()
            for t in range(r.iterations.count):
                self.iteration(Iteration(ctx, t))
            ctx.log(f"done: {r.iterations.count} iterations in {ctx.output_dir}")
            if is_main():
                self._report()
        finally:
            self._lock.release()

    def iteration(self, it: Iteration) -> None:
        """One iteration, stage by stage (each stage reuses its finished output)."""
        if is_main():
            it.dir.mkdir(parents=True, exist_ok=True)
        barrier()
        summary = it.stage("summary")
        if summary.done():
            it.log("done, skipping")
            stages.push(it)  # e.g. rerun with --hub.push=true after the run
            return
        it.log(f"start model {it.policy}")
        it.examples = iteration_examples(self.run_ctx.dataset(it.recipe), it.recipe, it.t)
        if it.spec.generates:
            stages.generate(it)
            stages.anchor_samples(it, stages.training_config(it))
            if it.spec.needs_judge:
                stages.judge(it)
        stages.pairs(it)
        stages.train(it)
        stages.evaluate(it)
        metrics = stages.summarise(it)
        stages.card(it, metrics)
        if is_main():
            write_json(it.dir / "metrics.json", metrics)
            summary.commit()
            self._collect_metrics()
        barrier()
        stages.push(it)

    # -- before the first iteration
    def preflight(self) -> None:
        """What validation cannot know on another machine, before any model loads: mixed precision without GPU, a
        missing vLLM, then missing local model paths, an unusable `output_dir`, a Hub token that does not work
        (`trl_selfplay.runner.checks`)."""
        from trl_selfplay.generation.vllm import is_vllm_available

        r = self.run_ctx.recipe
        for t in range(r.iterations.count):
            it = r.for_iteration(t)
            training = resolve_batch(it, it.training, int(os.environ.get("WORLD_SIZE", "1")))
            build_training_config(it.method, training, tempfile.gettempdir())
            if get_method(it.method).generates and it.generation.backend == "vllm" and not is_vllm_available():
                raise RecipeError(
                    f"{r.source}: `generation.backend` is 'vllm' (iteration {t}) but vLLM is not installed; install "
                    "the `vllm` extra or pass --generation.backend=transformers."
                )
        on_main(lambda: check_environment(r, hub_api=self.run_ctx.hub_api))

    def _claim_output_dir(self) -> None:
        """Main process: create `output_dir`, take its lock, apply `restart_from`, check every finished stage against
        the recipe and its recorded files, and store the recipe. Nothing is computed before this passes."""
        ctx = self.run_ctx
        try:
            ctx.output_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise RecipeError(
                f"`output_dir` {ctx.output_dir} cannot be created ({error}); pass --output_dir=<a writable directory>."
            ) from None
        self._lock.acquire()
        try:
            if self.restart is not None:
                moved = ctx.ledger.restart_from(*self.restart)
                ctx.log(
                    f"restarting from {stage_label(*self.restart)}: moved {len(moved)} output(s) to "
                    f"{ctx.output_dir / 'discarded'}/: " + ", ".join(str(p.relative_to(ctx.output_dir)) for p in moved)
                )
            ctx.ledger.verify()
            self._record_recipe()
        except BaseException:
            self._lock.release()
            raise

    def _record_recipe(self) -> None:
        """`recipe.yaml`: the recipe of the latest run. One that differs (in fields no finished stage depends on:
        `Ledger.verify` passed) replaces it, and the previous one is kept in `recipe_history/`, with a log line."""
        ctx = self.run_ctx
        path = ctx.output_dir / "recipe.yaml"
        text = yaml.safe_dump(ctx.recipe.raw, sort_keys=False)
        if path.exists():
            old = path.read_text()
            if old == text:
                return
            try:
                previous = _flatten(yaml.safe_load(old) or {})
            except yaml.YAMLError:
                previous = {}
            current = _flatten(ctx.recipe.raw)
            changed = sorted(k for k in set(previous) | set(current) if previous.get(k) != current.get(k))
            keep = ctx.output_dir / "recipe_history" / f"recipe-{time.strftime('%Y%m%d-%H%M%S')}.yaml"
            keep.parent.mkdir(exist_ok=True)
            os.replace(path, keep)
            ctx.log(
                f"recipe.yaml: this run's recipe differs in {', '.join(changed) or 'formatting'} (no finished stage "
                f"depends on those fields); the previous recipe is kept as {keep}."
            )
        write_text(path, text)

    def _build_start_model(self) -> None:
        """`model.build_fn`: build the start model (e.g. a tiny model trained from scratch) when its path is missing."""
        m = self.run_ctx.recipe.model
        if m.build_fn is None or os.path.exists(m.name_or_path):
            return
        if is_main():
            import shutil

            fn = import_callable(m.build_fn, "model.build_fn")
            tmp = m.name_or_path.rstrip("/") + ".tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            fn(tmp)
            os.replace(tmp, m.name_or_path)
        barrier()

    def _evaluate_start_model(self) -> None:
        ctx = self.run_ctx
        stage = ctx.stage("initial_eval")
        if not stage.done():
            ctx.log("evaluating the start model")
        stages.evaluate_model(
            ctx, ctx.recipe, stage, model_name_or_path=Iteration(ctx, 0).policy, previous_model_name_or_path=None,
            iteration=-1, output_dir=str(ctx.output_dir),
        )  # fmt: skip
        if is_main():
            self._collect_metrics()
        barrier()

    # -- after each iteration
    def _collect_metrics(self) -> None:
        """Rebuild `<output_dir>/metrics.jsonl` from the finished per-iteration files (so resuming never duplicates
        or loses a line); the file is rewritten only when its content changes."""
        ctx, r = self.run_ctx, self.run_ctx.recipe
        lines = []
        initial = ctx.output_dir / "initial_eval.json"
        if r.evaluation is not None and ctx.stage("initial_eval").done():
            model = Iteration(ctx, 0).policy
            lines.append(
                {"iteration": -1, "num_completed_iterations": 0, "method": r.method, "model": model, "train": {},
                 "eval": read_json(initial)}
            )  # fmt: skip
        for t in range(r.iterations.count):
            if ctx.stage("summary", t).done():
                lines.append(read_json(iteration_dir(ctx.output_dir, t) / "metrics.json"))
        path = ctx.output_dir / "metrics.jsonl"
        if (path.exists() and _jsonl_lines(path) == lines) or not (lines or path.exists()):
            return  # a finished run is not rewritten
        write_jsonl(path, lines)

    def _report(self) -> None:
        """The per-iteration summary table, and the run's plot next to its metrics.jsonl."""
        from trl_selfplay.evaluation import format_summary_table, read_metrics

        ctx = self.run_ctx
        metrics, png = ctx.output_dir / "metrics.jsonl", ctx.output_dir / "metrics.png"
        if not metrics.exists():
            return
        print(format_summary_table(read_metrics(ctx.output_dir)), flush=True)
        if png.exists() and png.stat().st_mtime >= metrics.stat().st_mtime:
            return  # a finished run is not rewritten
        if importlib.util.find_spec("matplotlib") is None:  # the `plot` extra
            ctx.log("install the `plot` extra (matplotlib) to get metrics.png")
            return
        from trl_selfplay.plotting import plot_run

        ctx.log(f"plot: {plot_run(ctx.output_dir, png)}")


def _flatten(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def _jsonl_lines(path) -> list[Any] | None:
    import json

    try:
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError):
        return None


def run_recipe(recipe: Recipe, hub_api: Any = None, restart_from: str | None = None) -> None:
    """Run (or resume) every iteration of a validated recipe (`restart_from`: see `SelfPlayRunner`)."""
    SelfPlayRunner(copy.deepcopy(recipe), hub_api=hub_api, restart_from=restart_from).run()
