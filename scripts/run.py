"""Run self-play recipes: `accelerate launch scripts/run.py recipes/<method>/<model>.yaml [--key.sub=value ...]`.

A thin wrapper around `trl_selfplay.cli.main` (also installed as the `trl-selfplay` console command).
"""

import sys
from pathlib import Path

# Works from a clone without `pip install -e .`: the repository root holds the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trl_selfplay.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
