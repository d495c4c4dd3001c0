"""Paired benchmark of prefix sharing (issue 15): `prefix_sharing="off"` and `"on"` measured step by step in ONE
process, alternating, so both see the same machine state.

`bench_step.py --prefix-sharing` measures every config in a fresh process. On this shared 2-core VM, the same
config varies by ±5% from process to process, which is more than the 2% the W1 target allows. Here, two
`SPINTrainer`s (each with its own copy of the model, loaded by path) take their training steps in turn: off, on, off,
on, and so on. The reported ratio is the median over steps of (on step) / (the mean of the off steps before and after
it). A slow phase of the machine then slows both sides of a ratio.

A step is `Trainer.training_step` (forward, loss, backward) plus the optimizer step and `zero_grad`, timed with
`perf_counter`. The reference precompute (TRL's `precompute_ref_log_probs`, forward only) is paired in the same way:
batches of 4 pairs through `compute_ref_log_probs`, alternating.

    python benchmarks/bench_prefix_sharing.py                    # W3 and W1, 30 steps, 1 torch thread
    python benchmarks/bench_prefix_sharing.py --threads 2 --workloads W3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _workloads import WORKLOADS, build_model_dir, preference_dataset, run_meta, training_args  # noqa: E402

HERE = Path(__file__).resolve().parent
MODES = ("off", "on")


def _trainers(workload, model_dir: Path, steps: int):
    from transformers import AutoTokenizer

    from trl_selfplay.trainers.spin import SPINConfig, SPINTrainer

    dataset = preference_dataset(workload, 0)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    trainers = {}
    for mode in MODES:
        args = SPINConfig(
            **training_args(workload, f"prefix_sharing_{mode}", steps),
            # No reference pass at construction: it is timed below, paired; the steps read zero reference columns.
            precompute_ref_log_probs=False,
            prefix_sharing=mode,
        )
        trainers[mode] = SPINTrainer(str(model_dir), args=args, train_dataset=dataset, processing_class=tokenizer)
    return trainers


def _paired_ratios(times: dict[str, list[float]]) -> list[float]:
    """(on step k) / mean(off step k, off step k + 1): the off steps taken just before and just after it."""
    off, on = times["off"], times["on"]
    return [on[k] / ((off[k] + off[k + 1]) / 2) for k in range(min(len(on), len(off) - 1))]


def measure(workload_name: str, model_root: Path, steps: int, warmup: int) -> dict:
    import torch

    workload = WORKLOADS[workload_name]
    model_dir = build_model_dir(workload, model_root)
    trainers = _trainers(workload, model_dir, steps + warmup)
    batches = {}
    for mode, trainer in trainers.items():
        loader = trainer.get_train_dataloader()
        batches[mode] = [trainer._prepare_inputs(batch) for batch in loader]  # one epoch, reused in turn
    # The same batches for both (the dataloaders share the seed): the comparison is layout against layout.
    for a, b in zip(batches["off"], batches["on"]):
        assert torch.equal(a["input_ids"], b["input_ids"])

    # Reference precompute, paired: forward only, no gradients, one batch of 4 pairs at a time.
    ref_times = {mode: [] for mode in MODES}
    for k in range(len(batches["off"])):
        for mode in (*MODES, "off") if k == len(batches["off"]) - 1 else MODES:
            trainer = trainers[mode]
            start = time.perf_counter()
            trainer.compute_ref_log_probs(trainer.model, batches[mode][k])
            ref_times[mode].append(time.perf_counter() - start)

    # Training steps, paired. The reference columns: zeros (the step's cost does not depend on their values).
    step_times = {mode: [] for mode in MODES}
    optimizers = {}
    for mode, trainer in trainers.items():
        trainer.create_optimizer_and_scheduler(num_training_steps=steps + warmup)
        trainer.current_gradient_accumulation_steps = 1  # set by `Trainer.train`'s loop, which this replaces
        optimizers[mode] = trainer.optimizer
        trainer.model.train()
        for batch in batches[mode]:
            size = batch["input_ids"].size(0) // 2
            batch["ref_chosen_logps"] = batch["ref_rejected_logps"] = torch.zeros(size)
    order = [mode for _ in range(steps + warmup) for mode in MODES] + ["off"]
    for i, mode in enumerate(order):
        trainer, k = trainers[mode], min(i // 2, steps + warmup - 1) % len(batches[mode])
        start = time.perf_counter()
        trainer.training_step(trainer.model, batches[mode][k])
        optimizers[mode].step()
        optimizers[mode].zero_grad()
        step_times[mode].append(time.perf_counter() - start)
    choices = sorted(getattr(trainers["on"], "_prefix_sharing_logged", ()))

    def summary(times: dict[str, list[float]]) -> dict:
        kept = {mode: values[warmup:] for mode, values in times.items()}
        ratios = _paired_ratios(kept)
        return {
            "median_s": {mode: statistics.median(values) for mode, values in kept.items()},
            "paired_ratio_median": statistics.median(ratios),
            "paired_ratio_quartiles": statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios,
            "pairs": len(ratios),
        }

    first = trainers["on"]._prefix_sharing_plan(trainers["on"].model, batches["on"][0], {})[0]
    return {
        "workload": workload_name,
        "description": workload.description,
        "position_ratio": first.position_ratio if first is not None else None,
        "attn_implementation": trainers["on"].model.config._attn_implementation,
        "choices": choices,
        "step": summary(step_times),
        "ref_precompute": summary(ref_times),
        "raw": {"step": step_times, "ref_precompute": ref_times},
    }


def markdown(result: dict) -> str:
    meta = result["meta"]
    lines = [
        f"Command: `{meta['command']}`; {meta['threads']} torch thread(s), {meta['steps']} measured steps after "
        f"{meta['warmup']} warm-up steps per side; load average {meta['loadavg_start']} at start, "
        f"{meta['loadavg_end']} at end.",
        "",
        "| workload | packed / unshared positions | step off (s) | step on (s) | step on / off (paired median, quartiles) "
        "| ref precompute off (s/batch) | on (s/batch) | on / off (paired median, quartiles) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for entry in result["workloads"]:
        step, ref = entry["step"], entry["ref_precompute"]
        quart = "–".join(f"{q:.3f}" for q in step["paired_ratio_quartiles"][::2])
        ref_quart = "–".join(f"{q:.3f}" for q in ref["paired_ratio_quartiles"][::2])
        lines.append(
            f"| {entry['workload']} | {entry['position_ratio']:.2f} | {step['median_s']['off']:.3f} | "
            f"{step['median_s']['on']:.3f} | **{step['paired_ratio_median']:.3f}×** ({quart}) | "
            f"{ref['median_s']['off']:.3f} | {ref['median_s']['on']:.3f} | **{ref['paired_ratio_median']:.3f}×** "
            f"({ref_quart}) |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", nargs="+", default=["W3", "W1"], choices=["W1", "W3", "tiny"])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--model-root", default=None, help="where the random models are saved (default: a temp dir)")
    parser.add_argument("--out", default=str(HERE / "results" / "prefix_sharing_paired.json"))
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    model_root = Path(args.model_root) if args.model_root else Path(tempfile.mkdtemp(prefix="bench_ps_models_"))
    meta = run_meta("bench_prefix_sharing.py", argv, threads=args.threads, steps=args.steps, warmup=args.warmup)
    result = {"meta": meta, "workloads": []}
    for name in args.workloads:
        entry = measure(name, model_root, args.steps, args.warmup)
        result["workloads"].append(entry)
        step, ref = entry["step"], entry["ref_precompute"]
        print(
            f"[bench_prefix_sharing] {name}: step on/off {step['paired_ratio_median']:.3f}, "
            f"ref precompute on/off {ref['paired_ratio_median']:.3f} ({entry['choices']})",
            file=sys.stderr,
        )
    meta["loadavg_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
