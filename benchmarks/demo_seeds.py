"""Run the `make demo` recipes with several seeds; per-iteration held-out accuracy, mean ± spread.

    python benchmarks/demo_seeds.py                  # seeds 0 1 2 -> benchmarks/results/demo.json
    python benchmarks/demo_seeds.py --seeds 0 --root /tmp/demo-seeds
    # seeds in parallel processes, then one table:
    python benchmarks/demo_seeds.py --seeds 1 --jobs 1 --output benchmarks/results/demo_seed1.json &  ...
    python benchmarks/demo_seeds.py --aggregate benchmarks/results/demo_seed*.json

A seed changes everything random in the pipeline: the warm start's initial weights and data order (so the step at
which it reaches its validation target), which 3,200 training prompts each method sees, sampling and training. The
task's held-out and validation sums are the same for every seed. Each seed runs `scripts/demo.py --seed s` (all of
`recipes/demo/*.yaml` through the real runner) in `<root>/seed<s>/`, then the ablations: SPIN and IRIS without
the NLL anchor (`--training.loss_type` without `sft`), which show which objectives lose the annotated likelihood.
Recorded per method and iteration: held-out accuracy, and the trainer's last logged `logps/chosen` (the policy's
log-probability of the annotated answer, or of RSPO's chosen sample) and `iris/alpha`.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))

# Ablations: (name, recipe, overrides). Same recipe, same compute, the preference term alone.
ABLATIONS = (
    ("spin-no-nll", "10_spin.yaml", ["--training.loss_type=[sigmoid]", "--training.loss_weights=[1.0]"]),
    ("iris-no-nll", "20_iris.yaml", ["--training.loss_type=[renyi]", "--training.loss_weights=[1.0]"]),
)
RECORDED = {"accuracy": "eval", "logps/chosen": "train", "iris/alpha": "train", "iris/gap": "train"}


def _summary(values: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def _demo_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("demo_script", REPO / "scripts" / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    return demo


def _collect(run_dir: Path) -> dict[str, dict[int, float]]:
    """{metric: {iteration: value}} of one run's metrics.jsonl (iteration -1 = the start model)."""
    from trl_selfplay.evaluation import read_metrics

    out: dict[str, dict[int, float]] = {}
    for line in read_metrics(run_dir):
        for metric, section in RECORDED.items():
            value = (line.get(section) or {}).get(metric)
            if isinstance(value, int | float):
                out.setdefault(metric, {})[int(line["iteration"])] = float(value)
    return out


def _run_seed(demo, seed: int, root: Path, jobs: int, ablations: bool, quick: bool) -> dict:
    from trl_selfplay.cli import main as run_main

    log_dir = root / "logs"
    options = ["--seed", str(seed), "--output-root", str(root), "--log-dir", str(log_dir), "--jobs", str(jobs)]
    if demo.main([*options, *(["--quick"] if quick else [])]):
        raise SystemExit(f"seed {seed}: the demo failed; see {log_dir}")
    runs = {
        recipe.stem.split("_", 1)[1]: root / recipe.stem.split("_", 1)[1]
        for recipe in sorted((REPO / "recipes" / "demo").glob("*.yaml"))
    }
    if ablations:
        seeds = [f"--{key}={seed}" for key in demo.SEED_KEYS]
        console = demo._Console(quiet=True)
        for name, recipe, overrides in ABLATIONS:
            path = REPO / "recipes" / "demo" / recipe
            moved = demo._recipe_overrides(path, str(root), quick=quick)
            with console.redirect(log_dir / f"{name}.log"):
                code = run_main([str(path), *moved, f"--output_dir={root / name}", *seeds, *overrides])
            if code:
                raise SystemExit(f"seed {seed}: ablation {name} failed; see {log_dir / name}.log")
            runs[name] = root / name
    with open(root / "warm-start" / "warm_start.json") as f:
        warm = json.load(f)
    return {
        "runs": {name: _collect(path) for name, path in runs.items()},
        "warm_start": {k: warm[k] for k in ("steps", "validation_accuracy", "target_accuracy")},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--root", default="runs/demo-seeds", help="output root; seed s goes to <root>/seed<s>")
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "demo.json"))
    parser.add_argument("--jobs", type=int, default=2, help="processes per seed for the demo recipes (default 2)")
    parser.add_argument("--no-ablations", action="store_true", help="skip SPIN / IRIS without the NLL anchor")
    parser.add_argument("--quick", action="store_true", help="smoke test: the demo's --quick settings")
    parser.add_argument("--aggregate", nargs="*", default=None, help="only merge these result files (no runs)")
    args = parser.parse_args(argv)
    if args.aggregate:
        per_seed, timings = {}, {}
        for path in args.aggregate:
            with open(path) as f:
                part = json.load(f)
            per_seed.update({int(s): _int_keys(r) for s, r in part["per_seed"].items()})
            timings.update({int(s): t for s, t in part["wall_time_seconds"].items()})
        return _report(per_seed, timings, args.output)

    demo = _demo_module()
    per_seed: dict[int, dict] = {}
    timings: dict[int, float] = {}
    for seed in args.seeds:
        root = Path(args.root) if Path(args.root).is_absolute() else REPO / args.root
        t0 = time.perf_counter()
        per_seed[seed] = _run_seed(demo, seed, root / f"seed{seed}", args.jobs, not args.no_ablations, args.quick)
        timings[seed] = time.perf_counter() - t0
    return _report(per_seed, timings, args.output)


def _int_keys(record: dict) -> dict:
    """JSON turns the iteration keys into strings; turn them back."""
    runs = {
        m: {k: {int(t): v for t, v in it.items()} for k, it in metrics.items()}
        for m, metrics in record["runs"].items()
    }
    return {**record, "runs": runs}


def _report(per_seed: dict[int, dict], timings: dict[int, float], output: str) -> int:
    methods = list(dict.fromkeys(m for record in per_seed.values() for m in record["runs"]))
    table: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    for method in methods:
        table[method] = {}
        for metric in RECORDED:
            values = [r["runs"][method].get(metric, {}) for r in per_seed.values() if method in r["runs"]]
            iterations = sorted({t for v in values for t in v})
            if iterations:
                table[method][metric] = {
                    ("start" if t == -1 else str(t)): _summary([v[t] for v in values if t in v]) for t in iterations
                }
    starts = {s: r["runs"]["rspo"]["accuracy"][-1] for s, r in per_seed.items() if "rspo" in r["runs"]}
    result = {
        "metric": "accuracy",
        "seeds": sorted(per_seed),
        "per_seed": {str(s): v for s, v in per_seed.items()},
        "summary": table,
        "wall_time_seconds": timings,
    }
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    with open(output, "w") as f:
        json.dump(result, f, indent=2)

    def cell(s: dict[str, float] | None) -> str:
        if not s or math.isnan(s["mean"]):
            return "-"
        return f"{s['mean']:.3f}±{s['std']:.3f} [{s['min']:.2f},{s['max']:.2f}]"

    for metric in ("accuracy", "logps/chosen"):
        rows = {m: t[metric] for m, t in table.items() if metric in t}
        iterations = sorted({i for r in rows.values() for i in r}, key=lambda t: -1 if t == "start" else int(t))
        print(f"\n{metric}, mean ± std over seeds {sorted(per_seed)} [min, max]:")
        print(f"{'method':<12} " + "  ".join(f"{t:>28}" for t in iterations))
        for method, row in rows.items():
            print(f"{method:<12} " + "  ".join(f"{cell(row.get(t)):>28}" for t in iterations))
    for seed, record in sorted(per_seed.items()):
        warm = record["warm_start"]
        line = f"seed {seed}: warm start {warm['steps']} steps (validation {warm['validation_accuracy']:.3f})"
        if seed in starts:
            last = record["runs"]["rspo"]["accuracy"]
            line += f"; RSPO {starts[seed]:.3f} -> {last[max(last)]:.3f}"
        if "iris" in record["runs"]:
            alphas = record["runs"]["iris"].get("iris/alpha", {})
            line += "; IRIS alpha " + " ".join(f"{alphas[t]:.2f}" for t in sorted(alphas))
        print(line)
    print(f"\nwrote {output}; wall time per seed: " + ", ".join(f"{s}: {t:.0f}s" for s, t in timings.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
