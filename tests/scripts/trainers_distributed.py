"""Launched by tests/test_trainers_distributed.py with `accelerate launch` (also imported by it for the
single-process reference run).

    accelerate launch --config_file tests/configs/<cfg>.yaml tests/scripts/trainers_distributed.py \
        iris-grad <policy_path> <ref_path> <out_file>
    accelerate launch --config_file tests/configs/<cfg>.yaml tests/scripts/trainers_distributed.py \
        smoke <policy_path> <out_file>
    accelerate launch --config_file tests/configs/<cfg>.yaml tests/scripts/trainers_distributed.py \
        smoke-impl <policy_path> <fused|direct> <out_file>
    accelerate launch --config_file tests/configs/<cfg>.yaml tests/scripts/trainers_distributed.py \
        rspo-forward-kl <policy_path> <anchor_path> <out_file>
    accelerate launch --config_file tests/configs/<cfg>.yaml tests/scripts/trainers_distributed.py \
        rspo-one-update <policy_path> <anchor_path> <on|off|auto> <out_file>
"""

import contextlib
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback  # noqa: E402

from trl_selfplay import IRISConfig, IRISTrainer, RSPOConfig, RSPOTrainer, SPINConfig, SPINTrainer  # noqa: E402
from trl_selfplay.runner import shutdown_distributed  # noqa: E402

PROMPTS = [
    "What is the capital of France?",
    "How many legs does a spider have?",
    "Hello",
    "Write a poem.",
    "Explain gravity to a child.",
    "one two three",
    "red green blue",
    "thank you",
]
REAL = [
    " Paris.",
    " Eight.",
    " hello thank you",
    " The sea is wide.",
    " Things fall down.",
    " four",
    " yellow",
    " please",
]
GENERATED = [" London", " one two", " dog", " cat fish", " The Earth pulls.", " five six", " tree", " house bird"]
ANCHOR_SAMPLES = [" Paris!", " It has eight.", " hi", " Waves.", " Down it goes.", " four five", " pink", " ok"]
WIN_PROBS = [0.9, 0.8, 0.7, 0.6, 0.9, 0.8, 0.7, 0.6]
COMMON = dict(report_to="none", gradient_checkpointing=False, save_strategy="no", seed=0, logging_steps=1)


def dataset(directory: str, rspo: bool = False) -> Dataset:
    """The dataset saved to and loaded from disk: TRL's reference precompute shares its result between processes
    through a cache file next to the dataset's files, which an in-memory dataset lacks (one temp dir per process).
    `rspo`: with win probabilities and one μ sample per prompt."""
    from accelerate import PartialState
    from datasets import load_from_disk

    path = os.path.join(directory, "dataset")
    columns = {"prompt": PROMPTS, "chosen": REAL, "rejected": GENERATED}
    if rspo:
        columns.update(
            chosen_win_prob=WIN_PROBS,
            rejected_win_prob=[1 - p for p in WIN_PROBS],
            anchor_completion=ANCHOR_SAMPLES,
        )
    with PartialState().main_process_first():
        if not os.path.exists(path):
            Dataset.from_dict(columns).save_to_disk(path)
    return load_from_disk(path)


class _GradCapture(TrainerCallback):
    """Copies the (already all-reduced) gradients just before the first optimizer step."""

    def __init__(self):
        self.grads = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.grads is None:
            self.grads = {n: p.grad.detach().cpu().clone() for n, p in model.named_parameters() if p.grad is not None}


def iris_gradient(policy_path: str, ref_path: str, out_dir: str, per_device_batch: int) -> dict:
    """One IRIS step on the whole 8-example dataset as ONE global batch; returns gradients and the logged loss."""
    args = IRISConfig(
        out_dir,
        alpha=2.0,
        beta=1.0,
        per_device_train_batch_size=per_device_batch,
        max_steps=1,
        max_grad_norm=0.0,
        precompute_ref_log_probs=True,
        **COMMON,
    )
    capture = _GradCapture()
    trainer = IRISTrainer(
        policy_path,
        ref_model=AutoModelForCausalLM.from_pretrained(ref_path, dtype=torch.float32),
        args=args,
        train_dataset=dataset(out_dir),
        processing_class=AutoTokenizer.from_pretrained(policy_path),
        callbacks=[capture],
    )
    trainer.train()
    logs = trainer.state.log_history[0]
    return {
        "grads": capture.grads,
        "loss": logs["loss"],
        "objective": logs["iris/objective"],
        "ess_real": logs["iris/ess_real"],
        "ess_generated": logs["iris/ess_generated"],
        "world_size": trainer.accelerator.num_processes,
    }


def _full_parameters(model) -> dict[str, torch.Tensor]:
    """CPU copies of the full parameters; under ZeRO-3 each process holds a shard, so gather them (collective)."""
    params = list(model.parameters())
    context = contextlib.nullcontext()
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        context = deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    with context:
        return {n: p.detach().cpu().clone() for n, p in model.named_parameters()}


def _spin_trainer(policy_path: str, out_dir: str, **config) -> SPINTrainer:
    args = SPINConfig(
        out_dir,
        per_device_train_batch_size=2,
        max_steps=3,
        learning_rate=1e-3,
        precompute_ref_log_probs=True,
        **COMMON,
        **config,
    )
    return SPINTrainer(
        policy_path,
        args=args,
        train_dataset=dataset(out_dir),
        processing_class=AutoTokenizer.from_pretrained(policy_path),
    )


def reference_logps(policy_path: str, out_dir: str, **config) -> dict[str, list[float]]:
    """The reference log-prob columns TRL's precompute adds to the dataset (no training)."""
    trainer = _spin_trainer(policy_path, out_dir, **config)
    return {name: trainer.train_dataset[name] for name in ("ref_chosen_logps", "ref_rejected_logps")}


def smoke(policy_path: str, out_dir: str, **config) -> dict:
    """A few SPIN steps (precomputed reference, LoRA-free full fine-tuning) under whatever launcher runs us."""
    trainer = _spin_trainer(policy_path, out_dir, **config)
    before = _full_parameters(trainer.model)
    trainer.train()
    after = _full_parameters(trainer.accelerator.unwrap_model(trainer.model_wrapped))
    changed = sum(not torch.equal(after[n], before[n]) for n in before)
    return {
        "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
        "changed": changed,
        "num_params": len(before),
        "shapes": {n: tuple(p.shape) for n, p in after.items()},
        "ref_logps": {name: trainer.train_dataset[name] for name in ("ref_chosen_logps", "ref_rejected_logps")},
        "distributed_type": str(trainer.accelerator.distributed_type),
        "deepspeed": trainer.is_deepspeed_enabled,
        "zero_stage": trainer.accelerator.state.deepspeed_plugin.zero_stage if trainer.is_deepspeed_enabled else None,
        "world_size": trainer.accelerator.num_processes,
        "ref_model_is_none": trainer.ref_model is None,
    }


def rspo_forward_kl(policy_path: str, anchor_path: str, out_dir: str, max_steps: int = 3, **config) -> dict:
    """RSPO with the forward-KL regularizer (a second policy forward per step, on the μ samples), μ loaded by path
    for the precompute."""
    args = RSPOConfig(
        out_dir,
        max_steps=max_steps,
        learning_rate=1e-3,
        beta=0.01,
        regularizers={"forward_kl": 1.0},
        anchor_model_name_or_path=anchor_path,
        precompute_ref_log_probs=True,
        **{"per_device_train_batch_size": 2, **COMMON, **config},
    )
    trainer = RSPOTrainer(
        policy_path,
        args=args,
        train_dataset=dataset(out_dir, rspo=True),
        processing_class=AutoTokenizer.from_pretrained(policy_path),
    )
    before = _full_parameters(trainer.model)
    trainer.train()
    after = _full_parameters(trainer.accelerator.unwrap_model(trainer.model_wrapped))
    logs = [e for e in trainer.state.log_history if "loss" in e]
    return {
        "losses": [e["loss"] for e in logs],
        "reg_forward_kl": [e["rspo/reg_forward_kl"] for e in logs],
        "anchor_completion_logps": trainer.train_dataset["anchor_completion_logps"],
        "changed": sum(not torch.equal(after[n], before[n]) for n in before),
        "num_params": len(before),
        "zero_stage": trainer.accelerator.state.deepspeed_plugin.zero_stage if trainer.is_deepspeed_enabled else None,
        "world_size": trainer.accelerator.num_processes,
    }


def rspo_one_update(policy_path: str, anchor_path: str, out_dir: str, prefix_sharing: str, **config) -> dict:
    """One SGD step at learning rate 1 (the parameter update is minus the clipped gradient) of RSPO with the forward-KL
    (a μ sample per pair) and reverse-KL regularizers, μ loaded by path. Records the shapes of the `input_ids` the
    policy's backbone receives in training: under prefix sharing, one packed row per prompt."""
    args = RSPOConfig(
        out_dir,
        max_steps=1,
        optim="sgd",
        learning_rate=1.0,
        lr_scheduler_type="constant",
        beta=0.01,
        regularizers={"forward_kl": 1.0, "reverse_kl": 0.5},
        anchor_model_name_or_path=anchor_path,
        precompute_ref_log_probs=True,
        prefix_sharing=prefix_sharing,
        **{"per_device_train_batch_size": 2, **COMMON, **config},
    )
    trainer = RSPOTrainer(
        policy_path,
        args=args,
        train_dataset=dataset(out_dir, rspo=True),
        processing_class=AutoTokenizer.from_pretrained(policy_path),
    )
    shapes = []
    trainer.model.base_model.register_forward_pre_hook(
        lambda module, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
    )
    before = _full_parameters(trainer.model)
    trainer.train()
    after = _full_parameters(trainer.accelerator.unwrap_model(trainer.model_wrapped))
    logs = [e for e in trainer.state.log_history if "loss" in e]
    columns = ("ref_chosen_logps", "ref_rejected_logps", "anchor_chosen_logps", "anchor_rejected_logps")
    return {
        "update": {n: after[n] - before[n] for n in before},
        "losses": [e["loss"] for e in logs],
        "reg_forward_kl": [e["rspo/reg_forward_kl"] for e in logs],
        "columns": {c: trainer.train_dataset[c] for c in (*columns, "anchor_completion_logps")},
        "shapes": shapes,
        "attn_implementation": trainer.model.config._attn_implementation,
        "zero_stage": trainer.accelerator.state.deepspeed_plugin.zero_stage if trainer.is_deepspeed_enabled else None,
        "world_size": trainer.accelerator.num_processes,
    }


def main() -> None:
    mode, *rest = sys.argv[1:]
    out_file = rest[-1]
    out_dir = os.path.join(os.path.dirname(out_file), f"run-{mode}")
    if mode == "iris-grad":
        result = iris_gradient(rest[0], rest[1], out_dir, per_device_batch=4)
    elif mode == "smoke":
        result = smoke(rest[0], out_dir)
    elif mode == "smoke-impl":
        result = smoke(rest[0], out_dir, logprob_impl=rest[1])
    elif mode == "rspo-forward-kl":
        result = rspo_forward_kl(rest[0], rest[1], out_dir)
    elif mode == "rspo-one-update":
        result = rspo_one_update(rest[0], rest[1], out_dir, prefix_sharing=rest[2])
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    from accelerate import PartialState

    if PartialState().is_main_process:
        torch.save(result, out_file)
    shutdown_distributed()


if __name__ == "__main__":
    main()
