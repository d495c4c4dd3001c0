"""Run `generate_completions` under `accelerate launch` and write what every process got back as JSON.

Usage: accelerate launch --multi_gpu --num_processes 2 tests/scripts/generation_multiprocess.py MODEL_DIR OUT_DIR
           [transformers|vllm]
"""

import json
import sys
from pathlib import Path

import torch
from accelerate import PartialState

from trl_selfplay.generation import generate_completions
from trl_selfplay.runner import shutdown_distributed

PROMPTS = [
    "What is the capital of France?",
    "hello",
    "Write a short poem about the sea.",
    "one two three",
    "Explain gravity to a child.",
]

# vLLM on CPU: a short context and no graph capture keep the engine small and quick to start.
VLLM_KWARGS = {"max_model_len": 256, "enforce_eager": True}


def main() -> None:
    model_dir, out_dir = sys.argv[1], Path(sys.argv[2])
    backend = sys.argv[3] if len(sys.argv) > 3 else "transformers"
    # cpu=True selects gloo when there is no GPU (accelerate only picks MULTI_CPU when asked to use the CPU).
    state = PartialState(cpu=not torch.cuda.is_available())
    extra = VLLM_KWARGS if backend == "vllm" else {"batch_size": 3}
    out = generate_completions(
        model_dir, PROMPTS, backend=backend, num_samples=2, max_new_tokens=12, seed=3, accelerator=state, **extra
    )
    record = {"world": state.num_processes, "completions": out.completions, "num_tokens": out.num_tokens}
    (out_dir / f"rank{state.process_index}.json").write_text(json.dumps(record))
    shutdown_distributed()


if __name__ == "__main__":
    main()
