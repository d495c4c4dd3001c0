"""Evaluate checkpoints standalone, with the same hook the runner calls after every iteration.

    python scripts/evaluate.py runs/demo/spin/iter_0/model runs/demo/spin/iter_1/model \
        --task arithmetic --task-kwargs '{"num_digits": 3}' --prompt-template '{prompt}'

Each checkpoint is compared with the one before it (win rate under the task's judge, or `--judge-function`); the
metrics go to stdout as one JSON line per checkpoint (and to `--output` as JSONL), followed by a summary table.
Without `--task`, give the prompts with `--prompts-file` (JSONL with a `prompt` field, or one prompt per line).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))


def _read_prompts(path: str) -> list[str]:
    prompts = []
    with open(path) as f:
        for line in f:
            line = line.rstrip("\n")
            if not line.strip():
                continue
            if path.endswith((".jsonl", ".json")):
                prompts.append(json.loads(line)["prompt"])
            else:
                prompts.append(line)
    return prompts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", help="model directories or Hub names, in iteration order")
    parser.add_argument("--task", default=None, help="bundled task (trl_selfplay.tasks.TASKS), e.g. arithmetic")
    parser.add_argument("--task-kwargs", default="{}", help="JSON keyword arguments of the task")
    parser.add_argument("--prompts-file", default=None, help="evaluation prompts when there is no task")
    parser.add_argument("--num-prompts", type=int, default=None)
    parser.add_argument("--prompt-template", default=None, help="e.g. '{prompt}'; default: the chat template")
    parser.add_argument("--judge-function", default=None, help="'module:function' reward function for the win rate")
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--diversity-prompts", type=int, default=50)
    parser.add_argument("--diversity-samples", type=int, default=4)
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the self-BLEU samples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lm-eval-tasks", default=None, help="comma-separated harness tasks, or 'spin' / 'iris'")
    parser.add_argument("--lm-eval-limit", type=float, default=None, help="examples per harness task (debugging)")
    parser.add_argument("--output", default=None, help="also write the metrics here as JSONL")
    args = parser.parse_args(argv)

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from trl_selfplay.evaluation import evaluate_iteration, format_summary_table

    try:
        task_kwargs = json.loads(args.task_kwargs)
    except json.JSONDecodeError as error:
        parser.error(f"--task-kwargs is not JSON: {error}")
    prompts = _read_prompts(args.prompts_file) if args.prompts_file else None
    lm_eval_tasks = None
    if args.lm_eval_tasks:
        names = [t for t in args.lm_eval_tasks.split(",") if t]
        lm_eval_tasks = names[0] if len(names) == 1 and names[0] in ("spin", "iris") else names
    lines = []
    previous = None
    for t, checkpoint in enumerate(args.checkpoints):
        metrics = evaluate_iteration(
            checkpoint,
            previous_model_name_or_path=previous,
            iteration=t - 1,  # the first checkpoint is the start model, as in a run's metrics.jsonl
            prompt_template=args.prompt_template,
            generation={"temperature": args.temperature},
            seed=args.seed,
            task=args.task,
            task_kwargs=task_kwargs,
            prompts=prompts,
            num_prompts=args.num_prompts,
            judge_function=args.judge_function,
            max_new_tokens=args.max_new_tokens,
            diversity_prompts=args.diversity_prompts,
            diversity_samples=args.diversity_samples,
            lm_eval_tasks=lm_eval_tasks,
            lm_eval_kwargs={"limit": args.lm_eval_limit} if args.lm_eval_limit else None,
        )
        line = {"iteration": t - 1, "model": checkpoint, "train": {}, "eval": metrics}
        print(json.dumps(line), flush=True)
        lines.append(line)
        previous = checkpoint
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        with open(args.output, "w") as f:
            for line in lines:
                f.write(json.dumps(line) + "\n")
    print(format_summary_table({"eval": lines}), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
