"""Drop-in TRL trainers for self-play fine-tuning (SPIN, IRIS, RSPO) and their shared base."""

from trl_selfplay.trainers.base import SelfPlayBatch, SelfPlayConfig, SelfPlayTrainerBase
from trl_selfplay.trainers.iris import IRISConfig, IRISTrainer
from trl_selfplay.trainers.rspo import DataCollatorForRSPO, RSPOConfig, RSPOTrainer
from trl_selfplay.trainers.spin import SPINConfig, SPINTrainer
from trl_selfplay.trainers.truncation import DataCollatorForSelfPlay, truncate_prompt_and_responses

__all__ = [
    "DataCollatorForRSPO",
    "DataCollatorForSelfPlay",
    "IRISConfig",
    "IRISTrainer",
    "RSPOConfig",
    "RSPOTrainer",
    "SPINConfig",
    "SPINTrainer",
    "SelfPlayBatch",
    "SelfPlayConfig",
    "SelfPlayTrainerBase",
    "truncate_prompt_and_responses",
]
