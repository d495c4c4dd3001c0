"""Training-step benchmark of SPINTrainer, IRISTrainer and RSPOTrainer against `trl.DPOTrainer` (issues 3 and 7),
and of prefix sharing (issue 15).

Workloads (benchmarks/_workloads.py): W1 = Llama, vocab 32,000, hidden 256, intermediate 688, 4 layers, 8 heads,
fp32, 19.5M parameters; W2 = W1 with vocab 8,192 and hidden 512; W3 = the W1 model with long prompts (prompt 512 +
completion 128 tokens). 64 random-token examples, prompt 64 + completion 192 tokens (W1, W2), batch 4 pairs,
rmsprop, lr 1e-6, β 0.1, no gradient checkpointing, 25 steps, 2 torch threads; the reported step time is the median
of steps 5–25.

Prefix sharing (`--prefix-sharing`: W1 and W3, configs `spin_unshared` / `spin_shared` / `spin` / `floor`): the SPIN
step and reference precompute with `prefix_sharing="off"` (TRL's layout, the baseline), `"on"` and the default
`"auto"`, against the (unshared) floor.

Every (run, workload, config) is measured in a fresh subprocess, so its peak RSS (`ru_maxrss`) is its own. Step times
come from a `TrainerCallback`: `step` = on_step_begin → on_step_end (forward, backward, clipping, optimizer and
scheduler step), `iteration` = on_step_end → next on_step_end (adds batch collation and logging). `logging_steps` is
TRL's default (10), so steps 10 and 20 of the measured window are logging steps. The floor is a bare loop without
`Trainer`: policy forward + backward through the direct path (backbone → completion positions → lm_head →
log_softmax/gather → SPIN sigmoid loss on precomputed reference log-probs) and the RMSprop step.

    python benchmarks/bench_step.py                      # W1 and W2, all default configs, 1 run
    python benchmarks/bench_step.py --runs 3 --workloads W1
    python benchmarks/bench_step.py --quick              # smoke run (< 1 min): tiny model, 6 steps, one process
    python benchmarks/bench_step.py --prefix-sharing     # issue 15: W1 and W3, prefix sharing off / on / auto
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _workloads import (  # noqa: E402
    EOS,
    WORKLOADS,
    Workload,
    build_model_dir,
    preference_dataset,
    random_token_ids,
    run_meta,
    training_args,
)

HERE = Path(__file__).resolve().parent
RESULTS_DIR = HERE / "results"

# name -> description; the order is the order of the table.
CONFIGS = {
    "dpo_ref": "`trl.DPOTrainer`, sigmoid, reference model resident (baseline)",
    "dpo_precompute": "`trl.DPOTrainer`, sigmoid, `precompute_ref_log_probs=True`",
    "spin": "`SPINTrainer`, defaults, precomputed reference",
    "iris": "`IRISTrainer`, defaults, precomputed reference",
    "rspo": "`RSPOTrainer`, defaults (SPPO, no regularizer), precomputed reference",
    "rspo_reg": "`RSPOTrainer`, reverse_kl 0.5 + forward_kl_is 0.1, anchor precomputed (= reference)",
    # Not a default: it does more work per step by design (a third sequence per pair), so issue 3/7's targets do not
    # apply; run it with --configs to see what the forward-KL term costs.
    "rspo_fkl": "`RSPOTrainer`, forward_kl 1.0: one μ sample per pair (completion length), one more forward",
    "spin_fused": "`SPINTrainer`, `logprob_impl='fused'` (TRL's fused LM head)",
    "spin_ref": "`SPINTrainer`, defaults, reference model resident",
    "spin_unshared": "`SPINTrainer`, `prefix_sharing='off'` (each prompt forwarded twice, as TRL)",
    "spin_shared": "`SPINTrainer`, `prefix_sharing='on'` (one packed row per pair)",
    "floor": "floor: bare loop, direct log-prob path + RMSprop step, no `Trainer`",
}
DEFAULT_CONFIGS = ("dpo_ref", "dpo_precompute", "spin", "iris", "rspo", "rspo_reg", "spin_fused", "floor")
OUR_TRAINERS = ("spin", "iris", "rspo", "rspo_reg")
PREFIX_SHARING_WORKLOADS = ("W1", "W3")
PREFIX_SHARING_CONFIGS = ("spin_unshared", "spin_shared", "spin", "floor")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


# ---------------------------------------------------------------------------------------------------------------
# Worker side (one fresh process per measurement)
def _run_floor(workload: Workload, model_dir: Path, steps: int, seed: int, profile: dict | None = None) -> dict:
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.train()
    backbone, lm_head = model.base_model, model.get_output_embeddings()
    ids = random_token_ids(workload, seed)
    eos_id = 1  # see _workloads.build_model_dir
    assert EOS == "</s>"
    chosen = torch.tensor([p + c + [eos_id] for p, c in zip(ids["prompt"], ids["chosen"], strict=True)])
    rejected = torch.tensor([p + r + [eos_id] for p, r in zip(ids["prompt"], ids["rejected"], strict=True)])
    prompt_len, bs, n = workload.prompt_length, workload.batch_size, workload.num_examples

    def sequence_logps(input_ids: torch.Tensor) -> torch.Tensor:
        # Hidden state t predicts token t+1: the completion tokens [P, T) are scored from positions [P-1, T-1).
        hidden = backbone(input_ids=input_ids, use_cache=False).last_hidden_state[:, prompt_len - 1 : -1]
        logits = lm_head(hidden).float()
        targets = input_ids[:, prompt_len:].unsqueeze(-1)
        return torch.log_softmax(logits, dim=-1).gather(-1, targets).squeeze(-1).sum(-1)

    def batch(i: int) -> torch.Tensor:
        start = (i * bs) % n
        return torch.cat([chosen[start : start + bs], rejected[start : start + bs]])

    start = time.perf_counter()
    ref = []
    with torch.no_grad():
        for i in range(n // bs):
            ref.append(sequence_logps(batch(i)))
    precompute_s = time.perf_counter() - start
    rss_init = _peak_rss_bytes()

    optimizer = torch.optim.RMSprop(model.parameters(), lr=workload.learning_rate)
    step_times, cpu_times, losses = [], [], []
    for k in range(steps):
        i = k % (n // bs)
        input_ids = batch(i)
        ref_chosen, ref_rejected = ref[i].chunk(2)
        if profile is not None and k == profile["first_step"] - 1:
            profile["profiler"].__enter__()
        t0, c0 = time.perf_counter(), time.process_time()
        policy_chosen, policy_rejected = sequence_logps(input_ids).chunk(2)
        margin = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
        loss = -F.logsigmoid(workload.beta * margin).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
        if profile is not None and k == profile["first_step"] - 2 + profile["num_steps"]:
            profile["profiler"].__exit__(None, None, None)
        losses.append(loss.item())
    return {
        "step_times": step_times,
        "cpu_step_times": cpu_times,
        "iteration_times": None,
        "ref_precompute_s": precompute_s,
        "anchor_precompute_s": None,
        "peak_rss_init_bytes": rss_init,
        "ref_model_resident": False,
        "logprob_impl": "direct (hand-written)",
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "num_parameters": sum(p.numel() for p in model.parameters()),
    }


def _run_trainer(
    config: str, workload: Workload, model_dir: Path, steps: int, seed: int, profile: dict | None = None
) -> dict:
    import torch
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from trl_selfplay.trainers.iris import IRISConfig, IRISTrainer
    from trl_selfplay.trainers.rspo import RSPOConfig, RSPOTrainer
    from trl_selfplay.trainers.spin import SPINConfig, SPINTrainer

    timings = {"ref": 0.0, "anchor": 0.0, "ref_calls": 0, "anchor_calls": 0}

    def timed(cls, name: str, key: str):
        original = getattr(cls, name)

        def wrapper(self, *args, **kwargs):
            t0 = time.perf_counter()
            try:
                return original(self, *args, **kwargs)
            finally:
                timings[key] += time.perf_counter() - t0
                timings[f"{key}_calls"] += 1

        setattr(cls, name, wrapper)

    # Benchmark-only instrumentation: time TRL's reference precompute (which our trainers reuse) and RSPO's anchor
    # precompute without touching the trainers' code.
    timed(DPOTrainer, "_precompute_ref_logps", "ref")
    timed(RSPOTrainer, "_ensure_anchor_columns", "anchor")

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.step_times, self.cpu_step_times, self.iteration_times = [], [], []
            self._begin = self._last_end = None
            self.rss_train_begin = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.rss_train_begin = _peak_rss_bytes()

        def on_step_begin(self, args, state, control, **kwargs):
            if profile is not None and state.global_step == profile["first_step"] - 1:
                profile["profiler"].__enter__()
            self._begin, self._cpu_begin = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            if profile is not None and state.global_step == profile["first_step"] - 1 + profile["num_steps"]:
                profile["profiler"].__exit__(None, None, None)
            self.step_times.append(now - self._begin)
            self.cpu_step_times.append(time.process_time() - self._cpu_begin)
            if self._last_end is not None:
                self.iteration_times.append(now - self._last_end)
            self._last_end = now

    rspo = config.startswith("rspo")
    dataset = preference_dataset(workload, seed, win_probs=rspo, anchor_samples=config == "rspo_fkl")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    common = dict(
        **training_args(workload, f"step_{config}", steps, seed),
        precompute_ref_log_probs=config not in ("dpo_ref", "spin_ref"),
    )
    if config in ("dpo_ref", "dpo_precompute"):
        trainer_cls, args = DPOTrainer, DPOConfig(**common)
    elif config in ("spin", "spin_ref"):
        trainer_cls, args = SPINTrainer, SPINConfig(**common)
    elif config == "spin_unshared":
        trainer_cls, args = SPINTrainer, SPINConfig(**common, prefix_sharing="off")
    elif config == "spin_shared":
        trainer_cls, args = SPINTrainer, SPINConfig(**common, prefix_sharing="on")
    elif config == "spin_fused":
        trainer_cls, args = SPINTrainer, SPINConfig(**common, logprob_impl="fused")
    elif config == "iris":
        trainer_cls, args = IRISTrainer, IRISConfig(**common)
    elif config == "rspo":
        trainer_cls, args = RSPOTrainer, RSPOConfig(**common)
    elif config == "rspo_reg":
        trainer_cls, args = RSPOTrainer, RSPOConfig(**common, regularizers={"reverse_kl": 0.5, "forward_kl_is": 0.1})
    elif config == "rspo_fkl":
        trainer_cls, args = RSPOTrainer, RSPOConfig(**common, regularizers={"forward_kl": 1.0})
    else:
        raise ValueError(f"unknown config {config!r}")

    timer = StepTimer()
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    trainer = trainer_cls(
        model=str(model_dir), args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=[timer]
    )
    init_s = time.perf_counter() - t0
    first = trainer.train_dataset[0]
    lengths = (len(first["prompt_ids"]), len(first["chosen_ids"]), len(first["rejected_ids"]))
    expected = (workload.prompt_length, workload.completion_length, workload.completion_length)
    if lengths != expected:
        raise RuntimeError(f"tokenized lengths {lengths} != {expected}: the workload is not the specified one")
    if next(trainer.model.parameters()).dtype != torch.float32:
        raise RuntimeError("the policy is not fp32")
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    choices = getattr(trainer, "_logprob_choices_logged", None)
    # Which prefix-sharing choices the trainer made (the keys of its one-time log lines).
    sharing = sorted(getattr(trainer, "_prefix_sharing_logged", ()))
    result = {
        "step_times": timer.step_times,
        "cpu_step_times": timer.cpu_step_times,
        "iteration_times": timer.iteration_times,
        "init_s": init_s,
        "ref_precompute_s": timings["ref"] if timings["ref_calls"] else None,
        "anchor_precompute_s": timings["anchor"] if timings["anchor_calls"] else None,
        "peak_rss_init_bytes": timer.rss_train_begin,
        "ref_model_resident": trainer.ref_model is not None,
        "logprob_impl": getattr(args, "logprob_impl", "trl fused") + (f" -> {sorted(choices)}" if choices else ""),
        "logging_steps": args.logging_steps,
        "prefix_sharing": getattr(args, "prefix_sharing", None) and f"{args.prefix_sharing} -> {sharing}",
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "train_loss": next((e["train_loss"] for e in trainer.state.log_history if "train_loss" in e), None),
        "num_parameters": sum(p.numel() for p in trainer.model.parameters()),
    }
    del trainer
    return result


def _worker(spec: dict) -> None:
    import torch

    torch.set_num_threads(spec["threads"])
    workload = Workload(**spec["workload"])
    results = []
    for config in spec["configs"]:
        profile = None
        if spec.get("profile_steps"):
            from torch.profiler import ProfilerActivity
            from torch.profiler import profile as torch_profile

            profile = {
                "profiler": torch_profile(activities=[ProfilerActivity.CPU], with_stack=False),
                "first_step": spec["profile_from"],
                "num_steps": spec["profile_steps"],
            }
        t0 = time.perf_counter()
        run = _run_floor if config == "floor" else functools.partial(_run_trainer, config)
        result = run(workload, Path(spec["model_dir"]), spec["steps"], spec["seed"], profile=profile)
        if profile is not None:
            table = profile["profiler"].key_averages().table(sort_by="self_cpu_time_total", row_limit=35)
            path = Path(spec["out"]).with_suffix(f".{config}.profile.txt")
            path.write_text(table)
            result["profile_path"] = str(path)
            print(f"[bench_step] profile of {config} ({spec['profile_steps']} steps):\n{table}", file=sys.stderr)
        result.update(
            config=config,
            workload=workload.name,
            wall_s=time.perf_counter() - t0,
            peak_rss_bytes=_peak_rss_bytes(),
            torch_threads=torch.get_num_threads(),
            loadavg_end=os.getloadavg(),
        )
        results.append(result)
    Path(spec["out"]).write_text(json.dumps(results))


# ---------------------------------------------------------------------------------------------------------------
# Parent side
def _median_from(values: list[float] | None, first_step: int, offset: int = 1) -> float | None:
    """Median of the values of steps `first_step`.. (1-based); `offset` is the step number of `values[0]`."""
    if not values:
        return None
    window = values[max(first_step - offset, 0) :]
    return statistics.median(window) if window else None


def _launch(spec: dict, timeout: float) -> list[dict]:
    env = dict(os.environ)
    threads = str(spec["threads"])
    env.update(
        OMP_NUM_THREADS=threads,
        MKL_NUM_THREADS=threads,
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        TQDM_DISABLE="1",
        TRANSFORMERS_VERBOSITY="error",
        PYTHONWARNINGS="ignore",
    )
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE.parent), env.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"worker {spec['configs']} on {spec['workload']['name']} failed:\n{proc.stderr[-4000:]}")
    return json.loads(Path(spec["out"]).read_text())


def _summarize(records: list[dict], first_step: int) -> dict:
    """Per workload and config: medians over runs of the per-run medians, and ratios."""
    summary: dict[str, dict] = {}
    for record in records:
        per_config = summary.setdefault(record["workload"], {}).setdefault(record["config"], {"runs": []})
        per_config["runs"].append(
            {
                "step_s": _median_from(record["step_times"], first_step),
                "cpu_step_s": _median_from(record.get("cpu_step_times"), first_step),
                "iteration_s": _median_from(record["iteration_times"], first_step, offset=2),
                "ref_precompute_s": record["ref_precompute_s"],
                "anchor_precompute_s": record.get("anchor_precompute_s"),
                "peak_rss_bytes": record["peak_rss_bytes"],
                "prefix_sharing": record.get("prefix_sharing"),
            }
        )
    for workload_name, configs in summary.items():
        num_examples = WORKLOADS[workload_name].num_examples
        for entry in configs.values():
            for key in (
                "step_s",
                "cpu_step_s",
                "iteration_s",
                "ref_precompute_s",
                "anchor_precompute_s",
                "peak_rss_bytes",
            ):
                values = [run[key] for run in entry["runs"] if run[key] is not None]
                entry[key] = statistics.median(values) if values else None
                if key == "step_s" and values:
                    entry["step_s_min"], entry["step_s_max"] = min(values), max(values)
            for key in ("ref_precompute_s", "anchor_precompute_s"):
                entry[key.removesuffix("_s") + "_ms_per_example"] = (
                    None if entry[key] is None else 1000 * entry[key] / num_examples
                )
        for entry in configs.values():
            for base in ("dpo_ref", "dpo_precompute", "floor"):
                if base in configs and entry["step_s"] is not None and configs[base]["step_s"]:
                    entry[f"step_vs_{base}"] = entry["step_s"] / configs[base]["step_s"]
            if "dpo_ref" in configs and entry["peak_rss_bytes"]:
                entry["rss_vs_dpo_ref"] = entry["peak_rss_bytes"] / configs["dpo_ref"]["peak_rss_bytes"]
            # Prefix sharing (issue 15): against the unshared SPIN trainer of the same run.
            unshared = configs.get("spin_unshared")
            if unshared is not None:
                for key, ratio in (
                    ("step_s", "step_vs_spin_unshared"),
                    ("ref_precompute_s", "ref_precompute_vs_spin_unshared"),
                    ("peak_rss_bytes", "rss_vs_spin_unshared"),
                ):
                    if entry[key] is not None and unshared[key]:
                        entry[ratio] = entry[key] / unshared[key]
    return summary


def _targets(summary: dict) -> list[dict]:
    """Targets of issue 7 (W1, W2), issue 3 (each workload) and issue 15 (W1, W3), as (check, value, limit, met)."""
    checks = []

    def add(workload, config, what, key, limit):
        entry = summary.get(workload, {}).get(config)
        if entry is None or entry.get(key) is None:
            return
        value = entry[key]
        checks.append(
            {"workload": workload, "config": config, "target": what, "value": value, "limit": limit,
             "met": value <= limit}
        )  # fmt: skip

    for config in OUR_TRAINERS:
        add("W1", config, "issue 7: step <= 0.5x DPOTrainer (resident ref)", "step_vs_dpo_ref", 0.5)
        add("W1", config, "issue 7: peak RSS <= 0.75x DPOTrainer (resident ref)", "rss_vs_dpo_ref", 0.75)
        add("W1", config, "issue 7: step <= 1.15x floor", "step_vs_floor", 1.15)
        add("W2", config, "issue 7: step <= 0.8x DPOTrainer (resident ref)", "step_vs_dpo_ref", 0.8)
        add("W2", config, "issue 7: step <= 1.15x floor", "step_vs_floor", 1.15)
        for workload in summary:
            add(workload, config, "issue 3: step <= 1.05x DPOTrainer (resident ref)", "step_vs_dpo_ref", 1.05)
            add(
                workload, config, "issue 3: step <= 1.05x DPOTrainer (precomputed ref)", "step_vs_dpo_precompute", 1.05
            )
            if config.startswith("rspo"):
                add(workload, config, "issue 3: RSPO peak RSS <= DPOTrainer (resident ref)", "rss_vs_dpo_ref", 1.0)
    for config in ("spin_shared", "spin"):  # prefix sharing on, and the default (auto)
        add("W3", config, "issue 15: step <= 0.75x unshared", "step_vs_spin_unshared", 0.75)
        add("W3", config, "issue 15: ref precompute <= 0.75x unshared", "ref_precompute_vs_spin_unshared", 0.75)
        add("W1", config, "issue 15: step <= 1.02x unshared", "step_vs_spin_unshared", 1.02)
        for workload in PREFIX_SHARING_WORKLOADS:
            add(workload, config, "issue 15: peak RSS <= unshared", "rss_vs_spin_unshared", 1.0)
    return checks


def _fmt(value, spec: str, suffix: str = "") -> str:
    return "–" if value is None else f"{value:{spec}}{suffix}"


def _prefix_sharing_table(configs: dict) -> list[str]:
    lines = [
        "Prefix sharing against the unshared SPIN trainer of the same run (`choice`: what the trainer logged):",
        "",
        "| config | step (s) | × unshared | × floor | ref precompute (ms/example) | × unshared | peak RSS (GiB) "
        "| × unshared | choice |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for config in ("spin_unshared", "spin_shared", "spin", "floor"):
        entry = configs.get(config)
        if entry is None:
            continue
        rss = None if entry["peak_rss_bytes"] is None else entry["peak_rss_bytes"] / 2**30
        choice = entry["runs"][0].get("prefix_sharing") or "–"
        lines.append(
            f"| {CONFIGS[config]} | {_fmt(entry['step_s'], '.3f')} "
            f"| {_fmt(entry.get('step_vs_spin_unshared'), '.2f', '×')} "
            f"| {_fmt(entry.get('step_vs_floor'), '.2f', '×')} "
            f"| {_fmt(entry['ref_precompute_ms_per_example'], '.1f')} "
            f"| {_fmt(entry.get('ref_precompute_vs_spin_unshared'), '.2f', '×')} | {_fmt(rss, '.2f')} "
            f"| {_fmt(entry.get('rss_vs_spin_unshared'), '.2f', '×')} | {choice} |"
        )
    return [*lines, ""]


def markdown(result: dict) -> str:
    lines = []
    meta = result["meta"]
    for workload_name, configs in result["summary"].items():
        workload = WORKLOADS[workload_name]
        lines += [
            f"### {workload_name}: {workload.description or workload_name}",
            "",
            f"{meta['runs']} run(s), {meta['steps']} steps, median of steps {meta['median_from']}–{meta['steps']}, "
            f"{meta['threads']} torch threads; load average {meta['loadavg_start']} at start, "
            f"{meta['loadavg_end']} at end.",
            "",
            "| config | step (s) | × DPOTrainer (ref) | × DPOTrainer (precomputed) | × floor | loop iteration (s) "
            "| step CPU time (s) | ref precompute (ms/example) | peak RSS (GiB) | × DPOTrainer RSS |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for config in CONFIGS:
            entry = configs.get(config)
            if entry is None:
                continue
            step = _fmt(entry["step_s"], ".3f")
            if entry.get("step_s_min") is not None and len(entry["runs"]) > 1:
                step += f" ({entry['step_s_min']:.3f}–{entry['step_s_max']:.3f})"
            precompute = _fmt(entry["ref_precompute_ms_per_example"], ".1f")
            if entry.get("anchor_precompute_ms_per_example") is not None:
                precompute += f" (+ anchor {entry['anchor_precompute_ms_per_example']:.1f})"
            rss = None if entry["peak_rss_bytes"] is None else entry["peak_rss_bytes"] / 2**30
            lines.append(
                f"| {CONFIGS[config]} | {step} | {_fmt(entry.get('step_vs_dpo_ref'), '.2f', '×')} "
                f"| {_fmt(entry.get('step_vs_dpo_precompute'), '.2f', '×')} "
                f"| {_fmt(entry.get('step_vs_floor'), '.2f', '×')} | {_fmt(entry['iteration_s'], '.3f')} "
                f"| {_fmt(entry.get('cpu_step_s'), '.3f')} "
                f"| {precompute} | {_fmt(rss, '.2f')} | {_fmt(entry.get('rss_vs_dpo_ref'), '.2f', '×')} |"
            )
        lines.append("")
        if "spin_unshared" in configs:
            lines += _prefix_sharing_table(configs)
    if result["targets"]:
        lines += ["### Targets", "", "| workload | trainer | target | value | met |", "|---|---|---|---|---|"]
        for check in result["targets"]:
            verdict = "yes" if check["met"] else f"**no** (by {check['value'] / check['limit'] - 1:+.0%})"
            lines.append(
                f"| {check['workload']} | {check['config']} | {check['target']} | {check['value']:.2f} | {verdict} |"
            )
        lines.append("")
    lines += [f"Command: `{meta['command']}`", ""]
    if not meta["rss_clean"]:
        lines += ["(Quick mode: all configs in one process, so peak RSS is cumulative and not comparable.)", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", nargs="+", default=["W1", "W2"], choices=sorted(WORKLOADS))
    parser.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--median-from", type=int, default=5, help="first (1-based) step of the median window")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: tiny model, 6 steps, all configs in one process"
    )
    parser.add_argument(
        "--prefix-sharing",
        action="store_true",
        help=f"issue 15: workloads {' '.join(PREFIX_SHARING_WORKLOADS)}, configs {' '.join(PREFIX_SHARING_CONFIGS)}",
    )
    parser.add_argument("--model-root", default=None, help="where the random models are saved (default: a temp dir)")
    parser.add_argument("--out", default=None, help="JSON output (default benchmarks/results/trainers[_quick].json)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per worker process")
    parser.add_argument(
        "--profile-steps",
        type=int,
        default=0,
        help="torch.profiler over this many steps from --median-from (slows them)",
    )
    parser.add_argument("--report", metavar="JSON", help="only print the markdown tables of an existing result file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        _worker(json.loads(args.worker))
        return 0
    if args.report:
        result = json.loads(Path(args.report).read_text())
        result["meta"].setdefault("loadavg_end", "(not recorded: the run was interrupted)")
        print(markdown(result))
        return 0

    if args.prefix_sharing:
        args.workloads, args.configs = list(PREFIX_SHARING_WORKLOADS), list(PREFIX_SHARING_CONFIGS)
    if args.quick:
        args.workloads, args.steps, args.median_from, args.runs = ["tiny"], 6, 3, 1
    if not 1 <= args.median_from <= args.steps:
        parser.error("--median-from must be between 1 and --steps")
    default_name = "trainers_quick.json" if args.quick else "trainers.json"
    if args.prefix_sharing:
        default_name = default_name.replace("trainers", "trainers_prefix_sharing")
    if args.profile_steps:  # profiled steps are slower: never overwrite the clean measurement
        default_name = default_name.replace(".json", "_profile.json")
    out = Path(args.out) if args.out else RESULTS_DIR / default_name
    out.parent.mkdir(parents=True, exist_ok=True)
    model_root = Path(args.model_root) if args.model_root else Path(tempfile.mkdtemp(prefix="bench_step_models_"))

    meta = run_meta(
        "bench_step.py",
        argv,
        runs=args.runs,
        steps=args.steps,
        median_from=args.median_from,
        threads=args.threads,
        seed=args.seed,
        configs=args.configs,
        rss_clean=not args.quick,
    )
    meta.update(
        cpu_count=os.cpu_count(),
        python=platform.python_version(),
    )
    try:
        import torch
        import transformers
        import trl

        meta.update(torch=torch.__version__, transformers=transformers.__version__, trl=trl.__version__)
    except ImportError:
        pass
    print(f"[bench_step] load average at start: {meta['loadavg_start']}", flush=True)
    model_dirs = {name: build_model_dir(WORKLOADS[name], model_root, seed=args.seed) for name in args.workloads}

    records: list[dict] = []

    def save() -> dict:
        result = {"meta": meta, "summary": _summarize(records, args.median_from), "records": records}
        result["targets"] = _targets(result["summary"])
        out.write_text(json.dumps(result, indent=1))
        return result

    groups = [[config] for config in args.configs] if not args.quick else [list(args.configs)]
    for run in range(args.runs):
        for workload_name in args.workloads:
            for group in groups:
                spec = {
                    "workload": WORKLOADS[workload_name].__dict__,
                    "model_dir": str(model_dirs[workload_name]),
                    "configs": group,
                    "steps": args.steps,
                    "seed": args.seed,
                    "threads": args.threads,
                    "profile_steps": args.profile_steps,
                    "profile_from": args.median_from,
                    "out": str(model_root / f"worker_{run}_{workload_name}_{'-'.join(group)}.json"),
                }
                t0 = time.perf_counter()
                for record in _launch(spec, args.timeout):
                    record["run"] = run
                    records.append(record)
                    if record.get("profile_path"):
                        print(Path(record["profile_path"]).read_text(), flush=True)
                    step = _median_from(record["step_times"], args.median_from)
                    print(
                        f"[bench_step] run {run + 1}/{args.runs} {workload_name} {record['config']}: "
                        f"step {step:.3f} s, peak RSS {record['peak_rss_bytes'] / 2**30:.2f} GiB "
                        f"({time.perf_counter() - t0:.0f} s wall, load {os.getloadavg()[0]:.2f})",
                        flush=True,
                    )
                save()

    meta["loadavg_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    meta["finished_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    result = save()
    print()
    print(markdown(result))
    print(f"[bench_step] results written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
