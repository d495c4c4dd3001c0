"""Self-play fine-tuning (SPIN, IRIS, RSPO) as drop-in Hugging Face TRL trainers."""

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Lazy exports: `import trl_selfplay` stays cheap (no torch/TRL import) until a trainer is used.
_EXPORTS = {
    "SPINTrainer": "trl_selfplay.trainers.spin",
    "SPINConfig": "trl_selfplay.trainers.spin",
    "IRISTrainer": "trl_selfplay.trainers.iris",
    "IRISConfig": "trl_selfplay.trainers.iris",
    "RSPOTrainer": "trl_selfplay.trainers.rspo",
    "RSPOConfig": "trl_selfplay.trainers.rspo",
    "PairRMJudge": "trl_selfplay.judges",
    "RewardFunctionJudge": "trl_selfplay.judges",
    "generate_completions": "trl_selfplay.generation",
}

__all__ = [
    "IRISConfig",
    "IRISTrainer",
    "PairRMJudge",
    "RSPOConfig",
    "RSPOTrainer",
    "RewardFunctionJudge",
    "SPINConfig",
    "SPINTrainer",
    "__version__",
    "generate_completions",
]

if TYPE_CHECKING:
    from trl_selfplay.generation import generate_completions
    from trl_selfplay.judges import PairRMJudge, RewardFunctionJudge
    from trl_selfplay.trainers.iris import IRISConfig, IRISTrainer
    from trl_selfplay.trainers.rspo import RSPOConfig, RSPOTrainer
    from trl_selfplay.trainers.spin import SPINConfig, SPINTrainer


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'trl_selfplay' has no attribute {name!r}")
