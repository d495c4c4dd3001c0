"""Shared base of the self-play trainers: turns a preference batch into per-sequence log-probs of the policy and
the reference, then hands them to one method hook, `selfplay_loss`.

It subclasses `trl.DPOTrainer` and overrides only `_compute_loss`, `compute_ref_log_probs` (which TRL's
`precompute_ref_log_probs` calls) and `_precompute_ref_logps` (to accept reference columns supplied with the
dataset), so TRL's tokenisation, collator, reference handling (resident model, precomputed
columns, PEFT with adapters disabled), DeepSpeed/FSDP preparation and metric logging are reused unchanged.

The forward (the log-prob paths and prefix sharing) lives in `trl_selfplay.trainers.forward`, the data side
(truncation policy, dropped rows, scored lengths) in `trl_selfplay.trainers.data`; both are mixed in here.
"""

from __future__ import annotations

import math
import os
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from accelerate.logging import get_logger
from trl import DPOConfig, DPOTrainer
from trl.trainer.utils import get_config_model_id

from trl_selfplay.trainers.data import SelfPlayDataMixin
from trl_selfplay.trainers.forward import (
    _MODEL_INPUT_KEYS,
    LogProbMixin,
    PrefixSharingMixin,
)
from trl_selfplay.trainers.prefix_sharing import (
    PREFIX_SHARING_MODES,
)
from trl_selfplay.trainers.truncation import DataCollatorForSelfPlay
from trl_selfplay.trainers.validation import check_pair_dataset

logger = get_logger(__name__)

LOGPROB_IMPLS = ("auto", "fused", "direct")
METRIC_OUTPUT_MODES = ("logging_steps", "always", "never")
# Batch keys the causal LM forward accepts; everything else in a collated batch is a column for the loss.
# Config attributes that rescale the logits; TRL's fused head applies them, the direct path does not.

# DPOConfig fields that tune TRL's own losses, with their defaults: a self-play trainer refuses any other value.
_DPO_LOSS_OPTIONS = (
    ("ld_alpha", None),
    ("use_weighting", False),
    ("f_divergence_type", "reverse_kl"),
    ("f_alpha_divergence_coef", 0.5),
    ("label_smoothing", 0.0),
    ("discopop_tau", 0.05),
)


def _has_bf16_accelerator() -> bool:
    if torch.cuda.is_available():
        return True
    xpu = getattr(torch, "xpu", None)
    return bool(xpu is not None and xpu.is_available())


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes", "on")


def _deepspeed_multiprocess_on_cpu() -> bool:
    """Launched by `accelerate launch` with DeepSpeed, several processes, and DeepSpeed's accelerator is the CPU."""
    if not _env_flag("ACCELERATE_USE_DEEPSPEED") or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name() == "cpu"


@dataclass
class SelfPlayConfig(DPOConfig):
    r"""
    Configuration shared by [`SPINConfig`], [`IRISConfig`] and [`RSPOConfig`]. Everything of
    [`~trl.DPOConfig`] applies, with these differences:

    - `loss_type` takes the method's own loss names, plus optionally `"sft"` (TRL's multi-loss convention, weighted
      by `loss_weights`): e.g. `loss_type=["sigmoid", "sft"], loss_weights=[1.0, 1.0]` adds an NLL anchor on the
      chosen (annotated) response, which keeps its likelihood from falling (see `docs/methods.md`).
    - `beta` must be > 0 and `learning_rate` >= 0 (checked at construction, before any model loads).
    - Rows whose prompt alone fills `max_length` (which TRL drops with `truncation_mode="keep_start"`) are dropped
      with a warning and counted: `trainer.dropped_rows` lists their indices per dataset.
    - `bf16` left unset defaults to `True` only when a CUDA/XPU device is present (TRL turns it on everywhere,
      which fails on CPU-only machines).
    - `ddp_backend` left unset defaults to `"gloo"` for a multi-process DeepSpeed launch on a CPU-only host, so
      accelerate counts all the processes (without it, it sizes DeepSpeed's batch for one process).
    - `ld_alpha`, `use_weighting`, `f_divergence_type`, `f_alpha_divergence_coef`, `label_smoothing` and
      `discopop_tau` tune TRL's DPO losses, which these trainers do not compute: a non-default value is rejected
      rather than ignored.

    Parameters:
        logprob_impl (`str`, *optional*, defaults to `"auto"`):
            How per-token log-probs are computed. `"fused"`: TRL's chunked fused LM head (`add_fused_lm_head`), which
            never materializes the logits. `"direct"`: run the backbone, project only the completion positions
            through the LM head and gather the log-probs (no logits for prompt or padding positions). `"auto"`:
            fused on CUDA devices with Triton or when the completion logits would exceed
            `logprob_auto_max_logits_bytes`, direct otherwise (the choice is logged once).
        logprob_auto_max_logits_bytes (`int`, *optional*, defaults to `2**30`):
            With `logprob_impl="auto"`, the largest float32 completion-logit tensor (completion tokens × vocabulary
            × 4 bytes) the direct path may build; larger batches use the fused path.
        max_prompt_length (`int` or `None`, *optional*, defaults to `None`):
            `None` keeps TRL's truncation: each prompt + completion is cut to `max_length` per `truncation_mode`.
            When set (0 < `max_prompt_length` < `max_length`), the originals' policy (TRL's pre-1.0 DPO collator, as
            in uclaml/SPIN, uclaml/SPPO and xiaohangt/RSPO): if prompt + the longer response exceed `max_length`, the
            prompt keeps its last `max_prompt_length` tokens, and if that is still too long both responses keep their
            first `max_length - max_prompt_length` tokens (see `trl_selfplay.trainers.truncation`). No row is dropped
            then; RSPO's μ samples are cut the same way.
        metric_outputs (`str`, *optional*, defaults to `"logging_steps"`):
            When to compute the metric-only outputs `entropy`, `logits/chosen`, `logits/rejected` and
            `mean_token_accuracy`: `"logging_steps"` (training steps that log, and evaluation), `"always"` (every
            step, as TRL does) or `"never"`.
        prefix_sharing (`str`, *optional*, defaults to `"auto"`):
            Whether to forward the prompt once per pair: each pair is packed into one sequence `[prompt][chosen]
            [p'][rejected]` (p' a copy of the prompt's last token) with a block mask that keeps the responses apart
            and position ids that restart after the prompt, in the policy forward and in the reference and anchor
            passes (see `trl_selfplay.trainers.prefix_sharing`). The log-probs are those of the unshared forward up
            to floating-point summation order. `"on"`: every batch that can be packed exactly; `"auto"`: those whose
            packed rows hold at most `prefix_sharing_auto_max_ratio` of the unshared token positions (the prompt is
            long relative to the responses); `"off"`: never. The model must use `attn_implementation="sdpa"` or
            `"eager"` with full causal attention in every layer; otherwise, and for batches whose prompts differ
            between chosen and rejected (e.g. `truncation_mode="keep_end"`), the unshared forward runs. An `sdpa`
            model is switched to `"trl_selfplay_sdpa"` (sdpa for every other call; the packed rows attended block by
            block, no L×L mask); an `eager` one gets the 4D block mask. Every choice is logged once.
        prefix_sharing_auto_max_ratio (`float`, *optional*, defaults to `0.8`):
            With `prefix_sharing="auto"`, the largest ratio of packed to unshared token positions (padding included)
            at which a batch is packed. The LM head, the log-softmax and the optimizer cost the same either way, so a
            small saving of positions does not pay: in `benchmarks/RESULTS.md` (§5) a packed step took 0.98× the
            unshared one at ratio 0.88, and 0.71× at ratio 0.60.
    """

    # Method loss names accepted in `loss_type` besides "sft"; set by each subclass.
    _method_loss_types: ClassVar[tuple[str, ...]] = ()

    logprob_impl: str = field(
        default="auto",
        metadata={
            "help": "How per-token log-probs are computed: 'fused' (TRL's chunked LM head), 'direct' (project only "
            "the completion positions through the LM head) or 'auto' (fused on Triton devices or for very large "
            "logits, direct otherwise).",
            "choices": list(LOGPROB_IMPLS),
        },
    )
    logprob_auto_max_logits_bytes: int = field(
        default=2**30,
        metadata={
            "help": "With logprob_impl='auto', the largest float32 completion-logit tensor (tokens x vocab x 4 "
            "bytes) the direct path may build; larger batches use the fused path."
        },
    )
    max_prompt_length: int | None = field(
        default=None,
        metadata={
            "help": "None: TRL's truncation. Set: the originals' policy (pre-1.0 TRL collator): when prompt + longer "
            "response exceed max_length, the prompt keeps its last max_prompt_length tokens, then both responses are "
            "cut to max_length - max_prompt_length if still too long."
        },
    )
    metric_outputs: str = field(
        default="logging_steps",
        metadata={
            "help": "When to compute entropy, mean logits and top-1 accuracy: 'logging_steps', 'always' or 'never'.",
            "choices": list(METRIC_OUTPUT_MODES),
        },
    )
    prefix_sharing: str = field(
        default="auto",
        metadata={
            "help": "Forward the prompt once per pair ([prompt][chosen][rejected] with a block mask): 'on' (every "
            "batch that can be packed exactly), 'auto' (batches where it saves token positions, see "
            "prefix_sharing_auto_max_ratio) or 'off'. Needs attn_implementation 'sdpa' (switched to "
            "'trl_selfplay_sdpa': attention per block) or 'eager' (a 4D mask).",
            "choices": list(PREFIX_SHARING_MODES),
        },
    )
    prefix_sharing_auto_max_ratio: float = field(
        default=0.8,
        metadata={
            "help": "With prefix_sharing='auto', the largest ratio of packed to unshared token positions (padding "
            "included) at which a batch is packed."
        },
    )

    def __post_init__(self):
        if isinstance(self.loss_type, str):
            self.loss_type = [self.loss_type]
        self.loss_type = list(self.loss_type)
        allowed = (*self._method_loss_types, "sft")
        unknown = [name for name in self.loss_type if name not in allowed]
        if unknown:
            raise ValueError(
                f"`loss_type` contains {unknown}, which {type(self).__name__} does not support. Use one of "
                f"{list(self._method_loss_types)}, optionally together with 'sft' (e.g. "
                f"loss_type=['{self._method_loss_types[0]}', 'sft'])."
            )
        method_types = [name for name in self.loss_type if name != "sft"]
        if len(method_types) != 1 or len(set(self.loss_type)) != len(self.loss_type):
            raise ValueError(
                f"`loss_type` must name exactly one of {list(self._method_loss_types)} (plus optionally 'sft', "
                f"each once), got {self.loss_type}."
            )
        if self.logprob_impl not in LOGPROB_IMPLS:
            raise ValueError(f"`logprob_impl` must be one of {list(LOGPROB_IMPLS)}, got {self.logprob_impl!r}.")
        if self.metric_outputs not in METRIC_OUTPUT_MODES:
            raise ValueError(
                f"`metric_outputs` must be one of {list(METRIC_OUTPUT_MODES)}, got {self.metric_outputs!r}."
            )
        if self.prefix_sharing not in PREFIX_SHARING_MODES:
            raise ValueError(
                f"`prefix_sharing` must be one of {list(PREFIX_SHARING_MODES)}, got {self.prefix_sharing!r}."
            )
        ratio = self.prefix_sharing_auto_max_ratio
        if not (isinstance(ratio, int | float) and math.isfinite(ratio) and ratio > 0):
            raise ValueError(
                f"`prefix_sharing_auto_max_ratio` must be a finite number > 0, got {ratio!r} (e.g. 0.8: pack a batch "
                "when its packed rows hold at most 80% of the unshared token positions)."
            )
        if self.padding_free:
            # TRL 1.16's DPOTrainer ignores it (a warning, then standard padding): refuse rather than ignore it.
            raise ValueError(
                "`padding_free=True` is not supported: TRL 1.16's DPOTrainer disables it too (it warns and pads). "
                "Set padding_free=False; to avoid forwarding each prompt twice, use `prefix_sharing` ('auto' or 'on')."
            )
        if not (isinstance(self.logprob_auto_max_logits_bytes, int) and self.logprob_auto_max_logits_bytes > 0):
            raise ValueError(
                f"`logprob_auto_max_logits_bytes` must be a positive integer, got {self.logprob_auto_max_logits_bytes!r}."
            )
        if not (isinstance(self.beta, int | float) and math.isfinite(self.beta) and self.beta > 0):
            raise ValueError(
                f"`beta` must be a finite number > 0, got {self.beta!r}: it scales the log-ratios against the reference "
                "(e.g. 0.1 for SPIN/IRIS, 0.001 for RSPO)."
            )
        if not (
            isinstance(self.learning_rate, int | float)
            and math.isfinite(self.learning_rate)
            and self.learning_rate >= 0
        ):
            raise ValueError(
                f"`learning_rate` must be a finite number >= 0, got {self.learning_rate!r} (e.g. 5e-7 as in the "
                "SPIN and RSPO papers)."
            )
        if self.max_prompt_length is not None:
            if self.max_length is None:
                raise ValueError(
                    "`max_prompt_length` needs `max_length`: the prompt is cut only when prompt + response exceed "
                    "it. Set max_length (e.g. 1024) or leave max_prompt_length=None."
                )
            if not (isinstance(self.max_prompt_length, int) and 0 < self.max_prompt_length < self.max_length):
                raise ValueError(
                    f"`max_prompt_length` must be an integer with 0 < max_prompt_length < max_length "
                    f"({self.max_length}), got {self.max_prompt_length!r} (the originals used 512 with max_length "
                    "1024); responses are cut to max_length - max_prompt_length when needed."
                )
        for name, default in _DPO_LOSS_OPTIONS:
            if getattr(self, name) != default:
                raise ValueError(
                    f"`{name}` is a DPO-specific option that {type(self).__name__} does not support; leave it at "
                    f"its default ({default!r})."
                )
        if self.bf16 is None and not self.fp16 and not _has_bf16_accelerator():
            self.bf16 = False  # TRL's bf16=True default fails on CPU-only machines
        if self.ddp_backend is None and _deepspeed_multiprocess_on_cpu():
            # accelerate finds no device backend on a CPU-only host and then reports ONE process, while DeepSpeed
            # runs on all of them: TRL's `prepare_deepspeed` fails DeepSpeed's batch-size check.
            self.ddp_backend = "gloo"
        super().__post_init__()
        if (
            self.deepspeed_plugin is not None
            and self.deepspeed_plugin.zero_stage == 3
            and (self.use_cpu or _env_flag("ACCELERATE_USE_CPU"))
        ):
            # transformers has already switched model loading to ZeRO-3 partitioning (`deepspeed.zero.Init`), but
            # `Accelerator(cpu=True)` disables DeepSpeed, so nothing would ever gather the parameters: the first
            # forward (TRL's `DPOTrainer._precompute_ref_logps`, which then skips `prepare_deepspeed`) fails with
            # "'weight' must be 2-D", in `trl.DPOTrainer` as well.
            raise ValueError(
                "DeepSpeed ZeRO-3 is configured but `use_cpu`/ACCELERATE_USE_CPU is set, which makes accelerate "
                "disable DeepSpeed while the model is still loaded partitioned. For ZeRO-3 on a CPU-only host, set "
                "`use_cpu: false` in the accelerate config and unset ACCELERATE_USE_CPU (DeepSpeed then runs on the "
                "CPU, with the gloo backend)."
            )


@dataclass
class SelfPlayBatch:
    """Per-sequence tensors of one (local) batch, as handed to `SelfPlayTrainerBase.selfplay_loss`.

    `chosen` = annotated (real) response for SPIN/IRIS, highest-scored sample for RSPO; `rejected` = generated /
    lowest-scored one. Log-probs are sums over completion tokens; `policy_*` carry gradients, `ref_*` do not.
    `columns` holds the collated batch, so trainers read their extra columns (e.g. win probabilities) from it.
    """

    policy_chosen_logps: torch.Tensor
    policy_rejected_logps: torch.Tensor
    ref_chosen_logps: torch.Tensor
    ref_rejected_logps: torch.Tensor
    chosen_lengths: torch.Tensor
    rejected_lengths: torch.Tensor
    columns: Mapping[str, Any]
    mode: str = "train"


def _named_datasets(train_dataset, eval_dataset) -> dict[str, Any]:
    """The datasets given to a trainer, keyed by how messages name them."""
    datasets = {} if train_dataset is None else {"train_dataset": train_dataset}
    if isinstance(eval_dataset, dict):
        datasets.update({f"eval_dataset[{k!r}]": v for k, v in eval_dataset.items()})
    elif eval_dataset is not None:
        datasets["eval_dataset"] = eval_dataset
    return datasets


class SelfPlayTrainerBase(SelfPlayDataMixin, LogProbMixin, PrefixSharingMixin, DPOTrainer):
    """`trl.DPOTrainer` with the loss replaced by `selfplay_loss(batch) -> (loss, metrics)`.

    Subclasses set `config_class` and implement `selfplay_loss`. Metrics returned as tensors are gathered across
    processes and averaged; plain floats are logged as given (the hook has already made them global).
    """

    config_class: ClassVar[type[SelfPlayConfig]] = SelfPlayConfig
    # The collator that replaces TRL's default `DataCollatorForPreference` (same fields plus `max_prompt_length`).
    collator_class: ClassVar[type[DataCollatorForSelfPlay]] = DataCollatorForSelfPlay
    # Dataset columns that must hold probabilities in [0, 1] when present (checked before any model loads).
    _probability_columns: ClassVar[tuple[str, ...]] = ()
    _tag_names = ["trl", "trl_selfplay"]
    _name = "SelfPlay"

    def __init__(
        self,
        model,
        ref_model=None,
        args: SelfPlayConfig | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        compute_metrics=None,
        callbacks=None,
        optimizers=(None, None),
        quantization_config=None,
        peft_config=None,
    ):
        if args is None:
            model_name = model if isinstance(model, str) else get_config_model_id(model.config)
            args = self.config_class(f"{model_name.split('/')[-1]}-{self._name}")
        if not isinstance(args, self.config_class):
            raise TypeError(
                f"`args` must be a {self.config_class.__name__} (got {type(args).__name__}); build it with "
                f"{self.config_class.__name__}(...) using the same fields as DPOConfig."
            )
        # Checks on the data run before any model is loaded.
        self._validate_datasets(args, train_dataset, eval_dataset)
        if (
            data_collator is not None
            and args.max_prompt_length is not None
            and getattr(data_collator, "max_prompt_length", None) != args.max_prompt_length
        ):
            raise ValueError(
                f"`max_prompt_length={args.max_prompt_length}` is applied by the collator, but the given "
                f"`data_collator` ({type(data_collator).__name__}) does not apply it. Pass a "
                "`trl_selfplay.trainers.truncation.DataCollatorForSelfPlay(..., max_prompt_length=...)` (or a subclass), "
                "leave `data_collator=None`, or set max_prompt_length=None."
            )
        # Indices (in the dataset as given) of the rows dropped because their prompt alone fills `max_length`.
        self.dropped_rows: dict[str, list[int]] = {}
        self._ref_model_given = ref_model is not None
        self._logprob_choices_logged: set[str] = set()
        # Prefix sharing: the choices logged so far, and per model (the unwrapped module) why it cannot take the block
        # mask (None: it can). Set before `DPOTrainer.__init__`, whose reference precompute already packs.
        self._prefix_sharing_logged: set[str] = set()
        self._prefix_sharing_support: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        super().__init__(
            model=model,
            ref_model=ref_model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            quantization_config=quantization_config,
            peft_config=peft_config,
        )
        self._use_selfplay_collator()
        self._install_heads()
        self.method_loss_type = next(name for name in self.loss_types if name != "sft")
        self._post_init()

    # ----------------------------------------------------------------------------------------------------------
    # Hooks for subclasses
    def _validate_datasets(self, args, train_dataset, eval_dataset) -> None:
        """Raise a ValueError for unusable data before any model work (subclasses extend): an empty dataset, missing
        `chosen` / `rejected`, `None` in `prompt` / `chosen` / `rejected`, bad values in `_probability_columns`."""
        for label, dataset in _named_datasets(train_dataset, eval_dataset).items():
            check_pair_dataset(dataset, label, probability_columns=self._probability_columns)
        if train_dataset is not None:
            first = next(iter(train_dataset))
            if "image" in first or "images" in first:
                raise ValueError(
                    "The self-play trainers support text-only datasets; `train_dataset` has an 'image'/'images' "
                    "column. Use `trl.DPOTrainer` for vision-language preference data."
                )

    def _post_init(self) -> None:
        """Runs at the end of `__init__`, once the datasets are prepared (subclasses extend)."""

    def selfplay_loss(self, batch: SelfPlayBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        """Map the batch to `(scalar loss, metrics)` with a pure function of `trl_selfplay.losses`."""
        raise NotImplementedError

    # ----------------------------------------------------------------------------------------------------------
    # The overridden TRL method
    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        with_metrics = self._want_metric_outputs(mode)
        completion_mask = inputs["completion_mask"]
        shift_completion_mask = completion_mask[:, 1:]
        seq_len = shift_completion_mask.size(1)
        outputs, extra_logps = self._response_logps(
            model, inputs, extra=self._extra_responses(inputs), with_metrics=with_metrics
        )
        per_token_logps = outputs.log_probs[:, -seq_len:]
        chosen_logps, rejected_logps = per_token_logps.sum(dim=1).chunk(2, dim=0)

        if "ref_chosen_logps" in inputs and "ref_rejected_logps" in inputs:
            ref_chosen_logps = inputs["ref_chosen_logps"].to(chosen_logps)
            ref_rejected_logps = inputs["ref_rejected_logps"].to(rejected_logps)
        else:
            ref_chosen_logps, ref_rejected_logps = self.compute_ref_log_probs(self.ref_model or model, inputs)

        chosen_lengths, rejected_lengths = shift_completion_mask.sum(dim=1).chunk(2, dim=0)
        batch = SelfPlayBatch(
            policy_chosen_logps=chosen_logps,
            policy_rejected_logps=rejected_logps,
            ref_chosen_logps=ref_chosen_logps.detach(),
            ref_rejected_logps=ref_rejected_logps.detach(),
            chosen_lengths=chosen_lengths,
            rejected_lengths=rejected_lengths,
            columns={**inputs, **extra_logps} if extra_logps else inputs,
            mode=mode,
        )
        method_loss, method_metrics = self.selfplay_loss(batch)

        loss = 0.0
        for loss_type, weight in zip(self.loss_types, self.loss_weights, strict=True):
            if loss_type == "sft":
                # TRL's "sft" term: mean NLL over the chosen completion tokens.
                chosen_mask, _ = shift_completion_mask.chunk(2, dim=0)
                chosen_token_logps, _ = per_token_logps.chunk(2, dim=0)
                sft_loss = -chosen_token_logps[chosen_mask.bool()].mean()
                loss = loss + weight * sft_loss
                method_metrics["sft_loss"] = sft_loss.detach()
            else:
                loss = loss + weight * method_loss

        if self.aux_loss_enabled and outputs.aux_loss is not None:
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(outputs.aux_loss).mean().item())

        self._log_metrics(mode, batch, inputs, outputs, shift_completion_mask, method_metrics)

        if return_outputs:
            with torch.no_grad():
                outputs = model(**{k: inputs[k] for k in _MODEL_INPUT_KEYS if k in inputs})
            return loss, outputs
        return loss

    def _log_metrics(self, mode, batch: SelfPlayBatch, inputs, outputs, shift_completion_mask, method_metrics):
        metrics = self._metrics[mode]
        gather = self.accelerator.gather
        seq_len = shift_completion_mask.size(1)
        chosen_mask, rejected_mask = shift_completion_mask.chunk(2, dim=0)

        if outputs.entropy is not None:  # metric-only outputs: logging steps only (see `metric_outputs`)
            mask = shift_completion_mask
            entropy_sum = gather((outputs.entropy[:, -seq_len:].detach() * mask).sum()).sum()
            total_tokens = gather(mask.sum()).sum()
            metrics["entropy"].append((entropy_sum / total_tokens).item() if total_tokens > 0 else 0.0)
            chosen_mean_logits, rejected_mean_logits = outputs.mean_logits[:, -seq_len:].chunk(2, dim=0)
            for name, values, sub_mask in (
                ("logits/chosen", chosen_mean_logits, chosen_mask),
                ("logits/rejected", rejected_mean_logits, rejected_mask),
            ):
                total = gather(values[sub_mask.bool()].sum().float()).sum()
                count = gather(sub_mask.sum()).sum()
                metrics[name].append((total / count).item() if count > 0 else 0.0)
            chosen_is_top1, _ = outputs.is_top1[:, -seq_len:].chunk(2, dim=0)
            correct = gather((chosen_is_top1 & chosen_mask.bool()).sum()).sum()
            count = gather(chosen_mask.sum()).sum()
            metrics["mean_token_accuracy"].append((correct / count).item() if count > 0 else 0.0)

        if mode == "train":
            self._total_train_tokens += gather(inputs["attention_mask"].sum()).sum().item() // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]

        chosen_rewards = self.beta * (batch.policy_chosen_logps.detach() - batch.ref_chosen_logps)
        rejected_rewards = self.beta * (batch.policy_rejected_logps.detach() - batch.ref_rejected_logps)
        chosen_rewards, rejected_rewards = gather(chosen_rewards), gather(rejected_rewards)
        metrics["rewards/chosen"].append(chosen_rewards.mean().item())
        metrics["rewards/rejected"].append(rejected_rewards.mean().item())
        metrics["rewards/accuracies"].append((chosen_rewards > rejected_rewards).float().mean().item())
        metrics["rewards/margins"].append((chosen_rewards - rejected_rewards).mean().item())
        metrics["logps/chosen"].append(gather(batch.policy_chosen_logps.detach()).mean().item())
        metrics["logps/rejected"].append(gather(batch.policy_rejected_logps.detach()).mean().item())

        for name, value in method_metrics.items():
            if isinstance(value, torch.Tensor):
                value = gather(value.detach().float().reshape(-1)).mean().item()
            metrics[name].append(float(value))
