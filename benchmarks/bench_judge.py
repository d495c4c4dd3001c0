"""PairRM throughput (ordered pairs per second): batched forwards vs one pair per forward (the original pipeline).

Two models, both random (no download): the tiny test checkpoint, and an encoder of DeBERTa-v3-large's size
(24 layers, hidden 1024, 16 heads; PairRM's backbone) with the tiny tokenizer's vocabulary (the embedding table's
size does not change the compute). Both runs are measured in this process, baseline and batched alike.

Usage: python benchmarks/bench_judge.py [--quick]   -> table on stdout, benchmarks/results/judge.json
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

from trl_selfplay.judges import PairRMJudge  # noqa: E402
from trl_selfplay.judges.pairrm import DEBERTA_V3_LARGE, PairRMModel  # noqa: E402
from trl_selfplay.testing import DEFAULT_CORPUS, make_tiny_pairrm  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "judge.json"
WORDS = " ".join(DEFAULT_CORPUS.split())


def _text(n_words: int, offset: int) -> str:
    words = WORDS.split()
    return " ".join(words[(offset + i) % len(words)] for i in range(n_words))


def _workload(num_prompts: int, k: int, prompt_words: int, answer_words: int):
    prompts = [_text(prompt_words, 7 * n) for n in range(num_prompts)]
    completions = [[_text(answer_words + 3 * i, 11 * n + 5 * i) for i in range(k)] for n in range(num_prompts)]
    return prompts, completions


def _throughput(judge: PairRMJudge, prompts, completions, batch_size: int, repeats: int) -> tuple[float, torch.Tensor]:
    judge.batch_size = batch_size
    judge.preference_matrix(prompts[:1], completions[:1])  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        probs = judge.preference_matrix(prompts, completions)
        best = min(best, time.perf_counter() - start)
    k = len(completions[0])
    return len(prompts) * k * (k - 1) / best, probs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="smaller workloads (a smoke run)")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        judge = PairRMJudge(str(make_tiny_pairrm(Path(tmp) / "tiny")), batch_size=1)
        setups = [("tiny (H=32, 2 layers)", judge, _workload(8 if args.quick else 16, 4, 12, 20), 3)]

        large = PairRMJudge(str(Path(tmp) / "tiny"), batch_size=1)
        config = large.model.pretrained_model.config.__class__(**DEBERTA_V3_LARGE, vocab_size=len(large.tokenizer))
        large.model = PairRMModel(config).eval()
        params = sum(p.numel() for p in large.model.parameters())
        # "A few pairs": 2 prompts x K=3 = 12 ordered pairs, short and realistic lengths.
        setups.append((f"DeBERTa-v3-large size ({params / 1e6:.0f}M), short", large, _workload(2, 3, 10, 15), 1))
        if not args.quick:
            setups.append(
                (f"DeBERTa-v3-large size ({params / 1e6:.0f}M), ~300 tok/pair", large, _workload(2, 3, 40, 60), 1)
            )

        for name, j, (prompts, completions), repeats in setups:
            pair_len = sum(len(ids) for ids in j.encode_prompt(prompts[0], completions[0][:2])[1]) + len(
                j.encode_prompt(prompts[0], [])[0]
            )
            k = len(completions[0])
            batched_size = len(prompts) * k * (k - 1)
            base, p_base = _throughput(j, prompts, completions, 1, repeats)
            fast, p_fast = _throughput(j, prompts, completions, min(batched_size, 64), repeats)
            assert torch.allclose(p_base, p_fast, atol=1e-4), "batching changed the results"
            rows.append(
                {
                    "model": name,
                    "pairs": batched_size,
                    "tokens_per_pair": pair_len,
                    "batch_size": min(batched_size, 64),
                    "pairs_per_s_batch1": round(base, 2),
                    "pairs_per_s_batched": round(fast, 2),
                    "speedup": round(fast / base, 2),
                }
            )
            print(rows[-1], flush=True)

    header = "| model | pairs | tokens/pair | batch | pairs/s, batch 1 | pairs/s, batched | speed-up |"
    print("\n" + header + "\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['pairs']} | {r['tokens_per_pair']} | {r['batch_size']} | "
            f"{r['pairs_per_s_batch1']} | {r['pairs_per_s_batched']} | {r['speedup']}x |"
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "load_average": os.getloadavg(),
    }
    RESULTS.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
