"""Evaluation hook used by tests/test_loop.py: records how the loop called it and measures one real number.

Importable as `loop_eval:evaluate` when `tests/scripts` is on PYTHONPATH.
"""

from __future__ import annotations

import json
from pathlib import Path


def evaluate(*, model_name_or_path, previous_model_name_or_path, iteration, output_dir, prompt_template, probe):
    """Mean per-token log-likelihood of `probe` (a fixed answer) under the evaluated model, plus the call record."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_name_or_path)
    model = AutoModelForCausalLM.from_pretrained(model_name_or_path)
    ids = tokenizer(probe, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    calls = Path(output_dir) / "eval_calls.jsonl"
    with open(calls, "a") as f:
        f.write(
            json.dumps(
                {
                    "model": model_name_or_path,
                    "previous": previous_model_name_or_path,
                    "iteration": iteration,
                    "prompt_template": prompt_template,
                }
            )
            + "\n"
        )
    return {"probe_logp_per_token": -loss}
