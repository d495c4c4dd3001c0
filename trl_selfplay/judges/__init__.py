"""Preference judges: PairRM (llm-blender's checkpoints, batched) and judges from Python callables."""

from trl_selfplay.judges.base import PreferenceJudge
from trl_selfplay.judges.callable import RewardFunctionJudge
from trl_selfplay.judges.pairrm import PairRMJudge, PairRMModel, load_pairrm
from trl_selfplay.judges.preferences import pairwise_preferences, preference_record, sppo_preferences

__all__ = [
    "PairRMJudge",
    "PairRMModel",
    "PreferenceJudge",
    "RewardFunctionJudge",
    "load_pairrm",
    "pairwise_preferences",
    "preference_record",
    "sppo_preferences",
]
