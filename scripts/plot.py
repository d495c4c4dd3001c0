"""Redraw the per-iteration plots from metrics.jsonl, one run or several overlaid.

python scripts/plot.py runs/demo/spin                     # -> runs/demo/spin/metrics.png
python scripts/plot.py runs/demo/sft runs/demo/spin runs/demo/iris -o comparison.png
python scripts/plot.py spin=runs/demo/spin sft=runs/demo/sft -o cmp.png --panels accuracy win_rate
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run directories or metrics.jsonl files, optionally label=path")
    parser.add_argument("-o", "--output", default=None, help="PNG path (default: <run>/metrics.png for one run)")
    parser.add_argument("--panels", nargs="*", default=None, help="metric keys to draw (default: all present)")
    parser.add_argument("--title", default=None)
    args = parser.parse_args(argv)

    from trl_selfplay.plotting import plot_runs

    runs = {}
    for spec in args.runs:
        label, _, path = spec.rpartition("=")
        path = Path(path)
        runs[label or (path.parent.name if path.is_file() else path.name)] = path
    if args.output is None:
        if len(runs) > 1:
            parser.error("several runs need --output (the overlay PNG)")
        only = next(iter(runs.values()))
        output = (only.parent if only.is_file() else only) / "metrics.png"
    else:
        output = Path(args.output)
    print(plot_runs(runs, output, title=args.title, panels=args.panels))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
