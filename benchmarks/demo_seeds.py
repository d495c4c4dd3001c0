"""Run the `make demo` recipes with several seeds; per-iteration held-out accuracy, mean ± spread.

    python benchmarks/demo_seeds.py                  # seeds 0 1 2 -> benchmarks/results/demo.json
    python benchmarks/demo_seeds.py --seeds 0 --root /tmp/demo-seeds
    # seeds in parallel processes, then one table:
    python benchmarks/demo_seeds.py --seeds 1 --threads 1 --output benchmarks/results/demo_seed1.json &  ...
    python benchmarks/demo_seeds.py --aggregate benchmarks/results/demo_seed*.json

A seed changes everything random in the pipeline: the initial weights (the start model is built here, before the
recipes run, so `model.build_fn` is not used), the warm start's data order, sampling and training. The task data and
the held-out prompts are the same for every seed. Each seed runs all of `recipes/demo/*.yaml` through the real runner
(`scripts/demo.py`), in its own output directory.
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

SEED_KEYS = ("training.seed", "generation.seed", "data.seed")


def _summary(values: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--root", default="runs/demo-seeds", help="output root; seed s goes to <root>/seed<s>")
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "demo.json"))
    parser.add_argument("--metric", default="accuracy")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads per process")
    parser.add_argument("--aggregate", nargs="*", default=None, help="only merge these result files (no runs)")
    parser.add_argument(
        "--collect-only", action="store_true", help="no runs: summarise the metrics already in <root>/seed<s>/"
    )
    args = parser.parse_args(argv)
    if args.aggregate:
        per_seed, timings = {}, {}
        for path in args.aggregate:
            with open(path) as f:
                part = json.load(f)
            per_seed.update(
                {
                    int(s): {m: {int(t): v for t, v in it.items()} for m, it in r.items()}
                    for s, r in part["per_seed"].items()
                }
            )
            timings.update({int(s): t for s, t in part["wall_time_seconds"].items()})
        return _report(per_seed, timings, args)

    import importlib.util

    spec = importlib.util.spec_from_file_location("demo_script", REPO / "scripts" / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    from trl_selfplay.evaluation import read_metrics
    from trl_selfplay.tasks.arithmetic import make_arithmetic_model

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    recipes = sorted((REPO / "recipes" / "demo").glob("*.yaml"))
    per_seed: dict[int, dict[str, dict[int, float]]] = {}
    timings = {}
    for seed in args.seeds:
        root = Path(args.root) if Path(args.root).is_absolute() else REPO / args.root
        root = root / f"seed{seed}"
        init = root / "init-model"
        if args.collect_only:
            per_seed[seed] = {}
            for recipe in recipes:
                method = recipe.stem.split("_", 1)[1]
                if (root / method / "metrics.jsonl").exists():
                    lines = read_metrics(root / method)
                    per_seed[seed][method] = {line["iteration"]: line["eval"][args.metric] for line in lines}
            continue
        if not init.exists():
            make_arithmetic_model(init, seed=seed)
        overrides = [f"--{key}={seed}" for key in SEED_KEYS]
        t0 = time.perf_counter()
        for recipe in recipes:
            extra = list(overrides)
            if recipe.name.startswith("00_"):
                extra.append(f"--sft.training.seed={seed}")
            code = demo.main(["--output-root", str(root), "--recipes", str(recipe), *extra])
            if code:
                return code
        timings[seed] = time.perf_counter() - t0
        per_seed[seed] = {}
        for recipe in recipes:
            method = recipe.stem.split("_", 1)[1]
            lines = read_metrics(root / method)
            per_seed[seed][method] = {line["iteration"]: line["eval"][args.metric] for line in lines}
    return _report(per_seed, timings, args)


def _report(per_seed: dict[int, dict[str, dict[int, float]]], timings: dict[int, float], args) -> int:
    methods = list(dict.fromkeys(m for runs in per_seed.values() for m in runs))
    table: dict[str, dict[str, dict[str, float]]] = {}
    for method in methods:
        seeds = [s for s in per_seed if method in per_seed[s]]
        iterations = sorted({t for s in seeds for t in per_seed[s][method]})
        # Partial runs (--collect-only while running): an iteration is summarised over the seeds that reached it.
        table[method] = {
            ("start" if t == -1 else str(t)): _summary(
                [per_seed[s][method][t] for s in seeds if t in per_seed[s][method]]
            )
            for t in iterations
        }
    result = {
        "metric": args.metric,
        "seeds": sorted(per_seed),
        "per_seed": {str(s): v for s, v in per_seed.items()},
        "summary": table,
        "wall_time_seconds": timings,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(result, f, indent=2)

    iterations = sorted({t for m in table.values() for t in m}, key=lambda t: -1 if t == "start" else int(t))
    print(f"\n{args.metric} on held-out prompts, mean ± std over seeds {sorted(per_seed)} [min, max]:")
    print("method  " + "  ".join(f"{t:>28}" for t in iterations))
    for method, row in table.items():
        cells = []
        for t in iterations:
            s = row.get(t)
            cells.append(
                f"{s['mean']:.3f}±{s['std']:.3f} [{s['min']:.2f},{s['max']:.2f}]"
                if s and not math.isnan(s["mean"])
                else "-"
            )
        print(f"{method:<7} " + "  ".join(f"{c:>28}" for c in cells))
    print(f"\nwrote {args.output}; wall time per seed: " + ", ".join(f"{s}: {t:.0f}s" for s, t in timings.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
