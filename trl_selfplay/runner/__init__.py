"""The multi-iteration runner (`run_recipe`), its stages and their shared context; see docs/pipeline.md."""

from trl_selfplay.runner.checks import check_environment, check_recipe_data
from trl_selfplay.runner.data import check_data, iteration_examples
from trl_selfplay.runner.distributed import setup_distributed, shutdown_distributed
from trl_selfplay.runner.runner import SelfPlayRunner, run_recipe

__all__ = [
    "SelfPlayRunner", "check_data", "check_environment", "check_recipe_data", "iteration_examples", "run_recipe",
    "setup_distributed", "shutdown_distributed",
]  # fmt: skip
