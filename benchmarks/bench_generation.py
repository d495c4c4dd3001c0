"""transformers generation throughput: batched `generate_completions` vs one prompt at a time (batch size 1).

Random tiny models built locally (no download); the same prompts, seed and settings for both runs, measured in this
process. With a fixed seed both runs produce the same completions (checked), so they do the same work.

Usage: python benchmarks/bench_generation.py [--quick]   -> table on stdout, benchmarks/results/generation.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from trl_selfplay.generation import generate_completions  # noqa: E402
from trl_selfplay.testing import DEFAULT_CORPUS, make_tiny_causal_lm  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "generation.json"


def _prompts(n: int) -> list[str]:
    lines = [line.strip() for line in DEFAULT_CORPUS.strip().splitlines()]
    return [f"{lines[i % len(lines)]} ({i})" for i in range(n)]


def _timed(model, tokenizer, prompts, batch_size, num_samples, max_new_tokens):
    start = time.perf_counter()
    out = generate_completions(
        model,
        prompts,
        tokenizer=tokenizer,
        num_samples=num_samples,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        seed=0,
    )
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="smaller workload (a smoke run)")
    args = parser.parse_args()
    num_prompts, num_samples, max_new_tokens = (8, 2, 16) if args.quick else (16, 2, 32)
    shapes = [("qwen2 H=64, 2 layers", {}), ("llama H=256, 4 layers, 8 heads", {"architecture": "llama"})]
    shapes[1][1].update(hidden_size=256, num_hidden_layers=4, num_attention_heads=8)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, kwargs in shapes:
            path = make_tiny_causal_lm(Path(tmp) / name.split()[0], **kwargs)
            model = AutoModelForCausalLM.from_pretrained(path).eval()
            tokenizer = AutoTokenizer.from_pretrained(path)
            prompts = _prompts(num_prompts)
            _timed(model, tokenizer, prompts[:2], 2, 1, 4)  # warm-up
            base_s, base = _timed(model, tokenizer, prompts, 1, num_samples, max_new_tokens)
            batch = num_prompts * num_samples
            fast_s, fast = _timed(model, tokenizer, prompts, batch, num_samples, max_new_tokens)
            assert fast.completions == base.completions, "batching changed the samples"
            tokens = sum(sum(row) for row in fast.num_tokens)
            rows.append(
                {
                    "model": name,
                    "sequences": batch,
                    "new_tokens": tokens,
                    "batch_size": batch,
                    "seconds_batch1": round(base_s, 2),
                    "seconds_batched": round(fast_s, 2),
                    "tokens_per_s_batch1": round(tokens / base_s, 1),
                    "tokens_per_s_batched": round(tokens / fast_s, 1),
                    "speedup": round(base_s / fast_s, 2),
                }
            )
            print(rows[-1], flush=True)

    print("\n| model | sequences | new tokens | tok/s, one sequence at a time | tok/s, batched | speed-up |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['sequences']} | {r['new_tokens']} | {r['tokens_per_s_batch1']} | "
            f"{r['tokens_per_s_batched']} | {r['speedup']}x |"
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "load_average": os.getloadavg(),
        "num_prompts": num_prompts,
        "num_samples": num_samples,
        "max_new_tokens": max_new_tokens,
    }
    RESULTS.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
