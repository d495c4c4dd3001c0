"""Per-iteration evaluation: task metric, win rate against the previous iteration, length, self-BLEU diversity.

`evaluate_iteration` is the runner's default evaluation hook (recipe section `evaluation:`, function
`trl_selfplay.evaluation:evaluate_iteration`) and is usable on its own (`scripts/evaluate.py`). Everything but the
optional lm-evaluation-harness hook runs offline on CPU.

Modules: `metrics` (BLEU, self-BLEU, win rate), `iteration` (`evaluate_iteration` and its `CompletionCache`),
`harness` (lm-evaluation-harness), `report` (reading `metrics.jsonl`, summary tables).
"""

from trl_selfplay.evaluation.harness import BENCHMARKS, lm_eval_arguments, run_lm_eval
from trl_selfplay.evaluation.iteration import COMPLETION_CACHE, CompletionCache, evaluate_iteration
from trl_selfplay.evaluation.metrics import bleu, self_bleu, win_rate
from trl_selfplay.evaluation.report import DEFAULT_COLUMNS, flatten_metrics, format_summary_table, read_metrics

__all__ = [
    "BENCHMARKS",
    "COMPLETION_CACHE",
    "CompletionCache",
    "DEFAULT_COLUMNS",
    "bleu",
    "evaluate_iteration",
    "flatten_metrics",
    "format_summary_table",
    "lm_eval_arguments",
    "read_metrics",
    "run_lm_eval",
    "self_bleu",
    "win_rate",
]
