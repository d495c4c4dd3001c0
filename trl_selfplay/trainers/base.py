"""Shared base of the self-play trainers: turns a preference batch into per-sequence log-probs of the policy and
the reference, then hands them to one method hook, `selfplay_loss`.

It subclasses `trl.DPOTrainer` and overrides only `_compute_loss`, `compute_ref_log_probs` (which TRL's
`precompute_ref_log_probs` calls) and `_precompute_ref_logps` (to accept reference columns supplied with the
dataset), so TRL's tokenisation, collator, reference handling (resident model, precomputed
columns, PEFT with adapters disabled), DeepSpeed/FSDP preparation and metric logging are reused unchanged.

Log-prob path (`logprob_impl`): TRL 1.16 patches the model with `trl.trainer.utils.add_fused_lm_head`, a chunked
LM head that recomputes the vocabulary projection in backward and, off Triton devices, scores every position
(prompt and padding included), always with the metric-only outputs (entropy, mean logits, top-1) on. On CPU, and
whenever the completion logits fit in memory, projecting only the completion positions through the LM head and
taking `log_softmax` + gather is faster (`benchmarks/RESULTS.md`). We re-patch the forward (`install_selfplay_head`) to offer
both paths and to compute the metric-only outputs only on logging steps.

Prefix sharing (`prefix_sharing`): the policy forward and the reference / anchor passes can pack each pair into one
sequence `[prompt][chosen][p'][rejected]` with a block mask (`trl_selfplay.trainers.prefix_sharing`), so the prompt
is forwarded once per pair instead of twice; the log-probs equal the unshared ones up to summation order.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import os
import types
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from accelerate.logging import get_logger
from accelerate.utils import is_peft_model
from datasets import Dataset
from trl import DPOConfig, DPOTrainer
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.dpo_trainer import DataCollatorForPreference
from trl.trainer.utils import FusedCausalLMOutput, add_fused_lm_head, get_config_model_id, use_adapter

from trl_selfplay.trainers.prefix_sharing import (
    PREFIX_SHARING_MODES,
    PackedPrompts,
    PrefixSharingUnavailable,
    mask_support_reason,
    pack_shared_prompt,
    split_pairs,
)
from trl_selfplay.trainers.truncation import DataCollatorForSelfPlay
from trl_selfplay.trainers.validation import check_pair_dataset

logger = get_logger(__name__)

LOGPROB_IMPLS = ("auto", "fused", "direct")
METRIC_OUTPUT_MODES = ("logging_steps", "always", "never")
_METRIC_OUTPUTS = ("log_probs", "entropy", "mean_logits", "is_top1")
# Batch keys the causal LM forward accepts; everything else in a collated batch is a column for the loss.
_MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "position_ids", "token_type_ids")
# Config attributes that rescale the logits; TRL's fused head applies them, the direct path does not.
_LOGIT_SCALE_ATTRS = (
    "final_logit_softcapping",
    "logit_scale",
    "output_multiplier",
    "lm_head_multiplier",
    "logits_scaling",
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
    - `ld_alpha`, `use_weighting` and a non-default `f_divergence_type` are DPO-specific and rejected.

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
            between chosen and rejected (e.g. `truncation_mode="keep_end"`), the unshared forward runs. Every choice
            is logged once.
        prefix_sharing_auto_max_ratio (`float`, *optional*, defaults to `0.8`):
            With `prefix_sharing="auto"`, the largest ratio of packed to unshared token positions (padding included)
            at which a batch is packed. The masked attention covers each packed row's whole length, so a small
            saving does not pay: in `benchmarks/RESULTS.md` a step at ratio 0.88 was slower packed, one at 0.60 took
            0.78× the unshared time.
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
            "prefix_sharing_auto_max_ratio) or 'off'. Needs attn_implementation 'sdpa' or 'eager'.",
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
        for name, default in (("ld_alpha", None), ("use_weighting", False), ("f_divergence_type", "reverse_kl")):
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


def _direct_log_probs(model, want_metrics: bool, input_ids, labels, **kwargs) -> FusedCausalLMOutput:
    """Backbone forward, then the LM head on the completion positions only (`labels != -100` after the shift)."""
    kwargs = {k: v for k, v in kwargs.items() if v is not None and k != "return_dict"}
    kwargs["use_cache"] = False
    hidden_states = model.base_model(input_ids=input_ids, **kwargs).last_hidden_state[:, :-1]
    labels = labels[:, 1:]
    mask = labels != -100
    lm_head = model.get_output_embeddings()
    # The module call (not `F.linear` on the weight) keeps DeepSpeed ZeRO-3 parameter gathering working.
    logits = lm_head(hidden_states[mask]).float()
    targets = labels[mask]
    all_logps = torch.log_softmax(logits, dim=-1)
    token_logps = all_logps.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    log_probs = token_logps.new_zeros(mask.shape).masked_scatter(mask, token_logps)
    entropy = mean_logits = is_top1 = None
    if want_metrics:
        with torch.no_grad():
            detached = logits.detach()
            probs_log = all_logps.detach()  # reuse the forward's log_softmax for the entropy
            entropy = mask.new_zeros(mask.shape, dtype=detached.dtype).masked_scatter(
                mask, -(probs_log.exp() * probs_log).sum(-1)
            )
            mean_logits = mask.new_zeros(mask.shape, dtype=detached.dtype).masked_scatter(mask, detached.mean(-1))
            is_top1 = mask.new_zeros(mask.shape).masked_scatter(mask, detached.argmax(-1) == targets)
    return FusedCausalLMOutput(
        loss=-log_probs.sum() / mask.sum().clamp(min=1),
        log_probs=log_probs,
        entropy=entropy,
        mean_logits=mean_logits,
        is_top1=is_top1,
        label_mask=mask,
    )


def install_selfplay_head(model) -> None:
    """Patch `model.forward` (a causal LM, not a PEFT wrapper) to accept `selfplay_logps="fused"|"direct"` and
    `selfplay_metrics=bool` (with `labels`), returning a `FusedCausalLMOutput`. Calls without `selfplay_logps` keep
    TRL's behaviour (`fused_lm_head=True` works as in `DPOTrainer`). Idempotent; going through `model.forward`
    (rather than calling the backbone directly) keeps DDP, DeepSpeed and PEFT wrappers in the loop."""
    current = model.__dict__.get("forward")
    if current is not None and getattr(current, "_selfplay_head", False):
        return
    model.__dict__.pop("forward", None)  # drop TRL's (or an older) patch, back to the class forward
    # Two TRL fused heads: log-probs only, and with the metric-only outputs `DPOTrainer` requests on every call.
    add_fused_lm_head(model, outputs=("log_probs",))
    fused_plain = model.__dict__.pop("forward")
    add_fused_lm_head(model, outputs=_METRIC_OUTPUTS)
    fused_metrics = model.__dict__.pop("forward")

    @functools.wraps(type(model).forward)
    def forward(self, *args, selfplay_logps=None, selfplay_metrics=False, **kwargs):
        if selfplay_logps is None:
            return fused_metrics(*args, **kwargs)
        if selfplay_logps == "fused":
            return (fused_metrics if selfplay_metrics else fused_plain)(*args, fused_lm_head=True, **kwargs)
        if selfplay_logps == "direct":
            return _direct_log_probs(self, selfplay_metrics, *args, **kwargs)
        raise ValueError(f"Unknown selfplay_logps={selfplay_logps!r}; expected 'fused' or 'direct'.")

    forward._selfplay_head = True
    model.forward = types.MethodType(forward, model)


def _unwrap(module):
    """The causal LM under DDP/DeepSpeed (`.module`) and PEFT (`get_base_model`) wrappers."""
    while hasattr(module, "module") and isinstance(module.module, torch.nn.Module):
        module = module.module
    if is_peft_model(module):
        module = module.get_base_model()
    return module


def _named_datasets(train_dataset, eval_dataset) -> dict[str, Any]:
    """The datasets given to a trainer, keyed by how messages name them."""
    datasets = {} if train_dataset is None else {"train_dataset": train_dataset}
    if isinstance(eval_dataset, dict):
        datasets.update({f"eval_dataset[{k!r}]": v for k, v in eval_dataset.items()})
    elif eval_dataset is not None:
        datasets["eval_dataset"] = eval_dataset
    return datasets


class SelfPlayTrainerBase(DPOTrainer):
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
    # Data: truncation policy, dropped rows, scored lengths
    def _use_selfplay_collator(self) -> None:
        """Replace TRL's default collator by `collator_class` with the same settings plus `max_prompt_length`.
        Runs before the first collation (TRL's reference precompute happens inside `DPOTrainer.__init__`)."""
        if type(self.data_collator) is DataCollatorForPreference:
            base = self.data_collator
            self.data_collator = self.collator_class(
                pad_token_id=base.pad_token_id,
                max_length=base.max_length,
                truncation_mode=base.truncation_mode,
                pad_to_multiple_of=base.pad_to_multiple_of,
                max_prompt_length=self.args.max_prompt_length,
            )

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        # TRL drops the rows whose prompt alone fills `max_length` (with `keep_start`) without a word: prepare
        # without that filter, then drop the same rows here, logged and recorded. With `max_prompt_length` the
        # prompt is cut instead, so no row is dropped.
        unfiltered = copy.copy(args)
        unfiltered.max_length = None
        dataset = super()._prepare_dataset(dataset, processing_class, unfiltered, dataset_name)
        if args.max_length is None or args.truncation_mode != "keep_start" or args.max_prompt_length is not None:
            self.dropped_rows[dataset_name] = []
            return dataset
        return self._drop_prompts_filling_max_length(dataset, args.max_length, dataset_name)

    def _drop_prompts_filling_max_length(self, dataset, max_length: int, name: str):
        hint = "set `max_prompt_length` (e.g. max_length // 2) to cut long prompts instead, or raise `max_length`"
        if isinstance(dataset, Dataset):
            import pyarrow.compute as pc

            lengths = pc.list_value_length(dataset.with_format("arrow")["prompt_ids"]).to_numpy(zero_copy_only=False)
            dropped = np.flatnonzero(lengths >= max_length)
            self.dropped_rows[name] = dropped.tolist()
            if dropped.size == 0:
                return dataset
            logger.warning(
                f"Dropped {dropped.size} of {len(dataset)} rows of the {name} dataset whose prompt alone has >= "
                f"max_length={max_length} tokens (rows {dropped[:10].tolist()}{'…' if dropped.size > 10 else ''}; "
                f"all in `trainer.dropped_rows[{name!r}]`): {hint}."
            )
            return dataset.select(np.flatnonzero(lengths < max_length))
        # An IterableDataset is filtered as it streams: rows are recorded (and logged) when first reached.
        dropped_list = self.dropped_rows.setdefault(name, [])

        def keep(example, index):
            if len(example["prompt_ids"]) < max_length:
                return True
            if index in dropped_list:  # a later epoch
                return False
            dropped_list.append(index)
            logger.warning(
                f"Dropped row {index} of the {name} dataset: its prompt alone has >= max_length={max_length} tokens "
                f"({len(dropped_list)} dropped so far): {hint}."
            )
            return False

        return dataset.filter(keep, with_indices=True)

    @property
    def num_dropped_rows(self) -> int:
        """How many rows of all datasets were dropped because their prompt alone fills `max_length` (see
        `dropped_rows` for which)."""
        return sum(len(rows) for rows in self.dropped_rows.values())

    def completion_lengths(self, dataset=None, batch_size: int = 64) -> tuple[list[int], list[int]]:
        """The number of chosen / rejected completion tokens the trainer scores per row of `dataset` (a dataset
        prepared by this trainer; default `train_dataset`), AFTER the collator's truncation: the lengths that match
        the summed log-probs (e.g. for IRIS's per-token gap, `trl_selfplay.losses.distribution_gap`)."""
        from torch.utils.data import DataLoader

        dataset = self.train_dataset if dataset is None else dataset
        chosen: list[int] = []
        rejected: list[int] = []
        for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=self.data_collator, shuffle=False):
            chosen_part, rejected_part = batch["completion_mask"].sum(dim=1).chunk(2, dim=0)
            chosen.extend(chosen_part.tolist())
            rejected.extend(rejected_part.tolist())
        return chosen, rejected

    # ----------------------------------------------------------------------------------------------------------
    # Log-prob path
    def _install_heads(self) -> None:
        install_selfplay_head(_unwrap(self.model))
        if self.ref_model is not None:
            install_selfplay_head(_unwrap(self.ref_model))

    @staticmethod
    def _has_logit_scaling(model) -> bool:
        text_config = _unwrap(model).config.get_text_config()
        return any(getattr(text_config, name, None) is not None for name in _LOGIT_SCALE_ATTRS)

    def _resolve_logprob_impl(self, model, num_tokens: int | torch.Tensor) -> str:
        """`logprob_impl` for a batch with `num_tokens` completion positions (an int or a mask to count)."""
        impl = self.args.logprob_impl
        if impl == "direct" and self._has_logit_scaling(model):
            raise ValueError(
                "`logprob_impl='direct'` does not apply the logit scaling/softcapping this model's config declares; "
                "use logprob_impl='fused' (or 'auto')."
            )
        if impl == "auto":
            from trl.kernels.chunked_logprob import _use_triton

            device = self.accelerator.device
            if device.type == "cuda" and _use_triton(device):
                impl, reason = "fused", f"Triton is available on {device}"
            elif (logits_bytes := self._logits_bytes(model, num_tokens)) > self.args.logprob_auto_max_logits_bytes:
                impl, reason = "fused", f"completion logits ({logits_bytes / 2**20:.0f} MiB) exceed the threshold"
            elif self._has_logit_scaling(model):
                impl, reason = "fused", "the model scales or softcaps its logits"
            else:
                impl, reason = "direct", f"completion logits ({logits_bytes / 2**20:.1f} MiB) fit on {device.type}"
            if impl not in self._logprob_choices_logged:
                self._logprob_choices_logged.add(impl)
                logger.info(f"logprob_impl='auto' uses the {impl} log-prob path: {reason}.")
        return impl

    @staticmethod
    def _logits_bytes(model, num_tokens: int | torch.Tensor) -> int:
        if isinstance(num_tokens, torch.Tensor):  # counted only when needed (a device sync on GPUs)
            num_tokens = int(num_tokens.sum())
        return num_tokens * _unwrap(model).config.get_text_config().vocab_size * 4

    def _extra_responses(self, inputs) -> dict[str, dict[str, torch.Tensor]]:
        """Further responses to the batch's prompts, one per pair, whose policy log-probs the loss reads: column name
        -> `input_ids` / `attention_mask` / `completion_mask` `[B, T']` (prompt + response, like the pairs). They are
        scored in the policy forward (in the pair's packed row under prefix sharing) and reach `selfplay_loss` as
        per-sequence log-probs in `batch.columns[name]`. None by default; RSPO adds its μ samples."""
        return {}

    def _per_token_logps(self, model, inputs, with_metrics: bool = False) -> FusedCausalLMOutput:
        """Per-token log-probs `[2B, T-1]` of a pair batch (zero outside the completion) through `model`'s forward,
        packed per `prefix_sharing`."""
        return self._response_logps(model, inputs, with_metrics=with_metrics)[0]

    def _response_logps(
        self, model, inputs, extra: Mapping[str, Mapping[str, torch.Tensor]] | None = None, with_metrics: bool = False
    ) -> tuple[FusedCausalLMOutput, dict[str, torch.Tensor]]:
        """Per-token log-probs `[2B, T-1]` of the pairs in `inputs` (chosen rows first), and per-sequence log-probs
        `[B]` of the `extra` responses (name -> inputs of one response per prompt, see `_extra_responses`).

        Under prefix sharing, one forward of the packed rows (the extra responses included when their prompts match);
        otherwise one forward of the pairs and one per extra group, as TRL does."""
        extra = dict(extra or {})
        packed, packed_names = self._prefix_sharing_plan(model, inputs, extra)
        values: dict[str, torch.Tensor] = {}
        if packed is None:
            outputs = self._unshared_logps(model, inputs, with_metrics)
        else:
            packed_outputs = self._packed_forward(model, packed, with_metrics)

            def pairs(name: str) -> torch.Tensor | None:
                value = getattr(packed_outputs, name)
                return None if value is None else torch.cat([packed.unpack(value, 0), packed.unpack(value, 1)])

            outputs = FusedCausalLMOutput(
                loss=packed_outputs.loss,
                log_probs=pairs("log_probs"),
                entropy=pairs("entropy"),
                mean_logits=pairs("mean_logits"),
                is_top1=pairs("is_top1"),
                label_mask=torch.cat(packed.gather_valid[:2]),
            )
            for group, name in enumerate(packed_names, start=2):
                values[name] = packed.unpack(packed_outputs.log_probs, group).sum(dim=1)
        for name, group_inputs in extra.items():
            if name not in values:
                values[name] = self._sequence_logps(model, group_inputs, paired=False)
        return outputs, values

    def _unshared_logps(self, model, inputs, with_metrics: bool = False) -> FusedCausalLMOutput:
        """Per-token log-probs `[N, T-1]` of the rows of `inputs` as they are (TRL's layout)."""
        completion_mask = inputs["completion_mask"]
        model_kwargs = {k: inputs[k] for k in _MODEL_INPUT_KEYS if k in inputs}
        model_kwargs["use_cache"] = False
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
        if self.aux_loss_enabled and torch.is_grad_enabled():
            # MoE: only TRL's fused head returns the router aux loss.
            impl = "fused"
            model_kwargs["output_router_logits"] = True
        else:
            impl = self._resolve_logprob_impl(model, completion_mask[:, 1:])
        return model(**model_kwargs, labels=labels, selfplay_logps=impl, selfplay_metrics=with_metrics)

    def compute_ref_log_probs(self, model, inputs):
        """Per-sequence reference log-probs `(chosen, rejected)` of one padded batch. TRL's precompute
        (`precompute_ref_log_probs=True`) calls this too, so the reference pass uses the same log-prob path."""
        install_selfplay_head(_unwrap(model))  # TRL's precompute runs inside DPOTrainer.__init__, before ours
        adapter_context = contextlib.nullcontext()
        if self.ref_model is None and is_peft_model(_peft_or_none(self.model)):
            unwrapped = _peft_or_none(self.model)
            adapter_context = use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
        with (
            torch.no_grad(),
            disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
            adapter_context,
            self.accelerator.autocast(),
        ):
            return self._sequence_logps(model, inputs).chunk(2, dim=0)

    def _sequence_logps(self, model, inputs, paired: bool = True) -> torch.Tensor:
        """Per-sequence sums of the completion-token log-probs `[N]` of one padded batch (`input_ids`,
        `attention_mask`, `completion_mask`); differentiable unless the caller disables gradients. `paired`: the rows
        are pairs (chosen rows first), packed per `prefix_sharing`; else one response per prompt, never packed."""
        seq_len = inputs["completion_mask"].size(1) - 1
        if paired:
            per_token = self._per_token_logps(model, inputs)
        else:
            per_token = self._unshared_logps(model, inputs)
        return per_token.log_probs[:, -seq_len:].sum(dim=1)

    # ----------------------------------------------------------------------------------------------------------
    # Prefix sharing
    def _prefix_sharing_plan(
        self, model, inputs, extra: Mapping[str, Mapping[str, torch.Tensor]]
    ) -> tuple[PackedPrompts | None, list[str]]:
        """The packed batch (None: run the unshared forward) and the names of the extra groups packed with it."""
        mode = self.args.prefix_sharing
        if mode == "off":
            return None, []
        reason = self._prefix_sharing_static_reason(model, inputs)
        log_key = reason  # one log line per kind of reason, not per batch
        plan: tuple[PackedPrompts | None, list[str]] = (None, [])
        if reason is None:
            groups = split_pairs(inputs)
            # All responses in one row if their prompts match, else the pairs alone (the extra ones unshared).
            for names in ([*extra], []) if extra else ([],):
                try:
                    packed = pack_shared_prompt(
                        groups + [extra[name] for name in names], pad_to_multiple_of=self.args.pad_to_multiple_of
                    )
                except PrefixSharingUnavailable as error:
                    reason = log_key = error.reason
                    continue
                limit = self.args.prefix_sharing_auto_max_ratio
                if mode == "auto" and packed.position_ratio > limit:
                    log_key = "auto-ratio"
                    reason = (
                        f"the packed rows would hold {packed.position_ratio:.2f}x the unshared token positions "
                        f"(> prefix_sharing_auto_max_ratio={limit})"
                    )
                    break  # fewer groups in a row save even less
                plan = (packed, names)
                break
        level = self._agree_on_prefix_sharing(0 if plan[0] is None else 2 + len(plan[1]))
        if level == 0:
            if plan[0] is not None:
                log_key, reason = "other-process", "another process cannot pack its batch"
            self._log_prefix_sharing(log_key, f"prefix_sharing={mode!r} runs the unshared forward: {reason}.")
            return None, []
        if level < 2 + len(plan[1]):  # another process packs fewer groups: do as it does
            names = [*extra][: level - 2]
            plan = (pack_shared_prompt(groups + [extra[n] for n in names], self.args.pad_to_multiple_of), names)
        packed, names = plan
        message = f"prefix_sharing={mode!r} packs each pair" + "".join(f" and its `{name}`" for name in names)
        message += f" into one row (first batch: {packed.position_ratio:.2f}x the unshared token positions)"
        if len(names) < len(extra):
            message += f"; {[n for n in extra if n not in names]} run unshared: {reason or 'as another process'}"
        self._log_prefix_sharing(f"packed-{names}", message + ".")
        return plan

    def _prefix_sharing_static_reason(self, model, inputs) -> str | None:
        """Why no batch of this kind can be packed for `model`, or None."""
        carried = [key for key in ("position_ids", "token_type_ids") if key in inputs]
        if carried:
            return f"the batch carries {carried}, which the packed rows would have to rebuild"
        if self.aux_loss_enabled and torch.is_grad_enabled():
            return "the MoE router loss would count each prompt once instead of twice"
        unwrapped = _unwrap(model)
        if unwrapped not in self._prefix_sharing_support:
            reason = mask_support_reason(unwrapped)
            peft_model = _peft_or_none(model)
            if reason is None and is_peft_model(peft_model) and peft_model.active_peft_config.is_prompt_learning:
                reason = "a prompt-learning PEFT adapter prepends virtual tokens to every row"
            if reason is None:
                reason = self._check_packed_forward(model)
            self._prefix_sharing_support[unwrapped] = reason
        return self._prefix_sharing_support[unwrapped]

    def _check_packed_forward(self, model) -> str | None:
        """Once per model: the packed forward of a small synthetic batch (two prompts of different lengths) must
        reproduce the unshared one, so an architecture that ignores or alters the mask or the position ids falls
        back instead of training on wrong log-probs. Runs on every process at the same call (the model's first
        forward), so sharded models stay in step."""
        unwrapped = _unwrap(model)
        vocab_size = unwrapped.config.get_text_config().vocab_size
        generator = torch.Generator().manual_seed(0)
        layout = [(3, 2, 3), (2, 3, 1)]  # (prompt, chosen, rejected) lengths
        width = max(p + max(c, r) for p, c, r in layout)
        rows = {key: torch.zeros((4, width), dtype=torch.long) for key in ("input_ids", "attention_mask")}
        rows["completion_mask"] = torch.zeros((4, width), dtype=torch.long)
        for i, (prompt_len, *response_lens) in enumerate(layout):
            prompt = torch.randint(vocab_size, (prompt_len,), generator=generator)
            for half, response_len in enumerate(response_lens):
                row, end = 2 * half + i, prompt_len + response_len
                rows["input_ids"][row, :end] = torch.cat(
                    [prompt, torch.randint(vocab_size, (response_len,), generator=generator)]
                )
                rows["attention_mask"][row, :end] = 1
                rows["completion_mask"][row, prompt_len:end] = 1
        rows = {key: value.to(self.accelerator.device) for key, value in rows.items()}
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
                expected = self._unshared_logps(model, rows).log_probs
                packed = pack_shared_prompt(split_pairs(rows))
                packed_log_probs = self._packed_forward(model, packed, False).log_probs
                got = torch.cat([packed.unpack(packed_log_probs, 0), packed.unpack(packed_log_probs, 1)])
        except Exception as error:  # noqa: BLE001 - any failure means: do not pack for this model
            return f"the packed forward failed on a test batch ({type(error).__name__}: {error})"
        finally:
            model.train(was_training)
        mask = rows["completion_mask"][:, 1:].bool()
        difference = (got.float() - expected.float()).masked_fill(~mask, 0).abs().max().item()
        tolerance = 1e-4 if _compute_dtype(model, rows["input_ids"].device) == torch.float32 else 5e-2
        if not difference <= tolerance:
            return (
                f"the packed forward differs from the unshared one by {difference:.2g} (> {tolerance}) on a test batch: "
                "the model does not apply the block mask or the position ids as given"
            )
        return None

    def _packed_forward(self, model, packed: PackedPrompts, with_metrics: bool) -> FusedCausalLMOutput:
        """One forward of the packed rows; per-token outputs in the packed layout `[N, L-1]`."""
        # An additive mask in the dtype of the attention scores, built once: given a boolean mask, sdpa converts it in
        # every layer (and keeps each copy for the backward); eager adds it to the scores.
        attention_mask = packed.attention_mask(_compute_dtype(model, packed.input_ids.device))
        impl = self._resolve_logprob_impl(model, packed.labels[:, 1:] != -100)
        return model(
            input_ids=packed.input_ids,
            attention_mask=attention_mask,
            position_ids=packed.position_ids,
            labels=packed.labels,
            use_cache=False,
            selfplay_logps=impl,
            selfplay_metrics=with_metrics,
        )

    def _agree_on_prefix_sharing(self, level: int) -> int:
        """With parameters sharded across processes (DeepSpeed ZeRO-3, FSDP), every forward gathers them
        collectively, so all processes must run the same number of forwards: they take the lowest packing level
        (0 unshared, 2 the pairs, 2 + k with k extra groups) any of them can use. Elsewhere each process decides."""
        if self.accelerator.num_processes <= 1:
            return level
        zero3 = self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3
        if not (zero3 or self.is_fsdp_enabled):
            return level
        agreed = torch.tensor([level], device=self.accelerator.device)
        torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MIN)
        return int(agreed.item())

    def _log_prefix_sharing(self, key: str, message: str) -> None:
        if key not in self._prefix_sharing_logged:
            self._prefix_sharing_logged.add(key)
            logger.info(message)

    def _precompute_ref_logps(self, dataset, name: str, batch_size: int):
        # Reference columns supplied with the dataset (e.g. by the multi-iteration runner, which needs the reference
        # pass anyway) are used as they are: no reference forward and no reference model.
        if all(column in (dataset.column_names or []) for column in ("ref_chosen_logps", "ref_rejected_logps")):
            logger.info(f"Using the reference log-prob columns supplied with the {name} dataset.")
            return dataset
        self._use_selfplay_collator()  # the reference pass must see the training truncation
        return super()._precompute_ref_logps(dataset, name, batch_size)

    def _want_metric_outputs(self, mode: str) -> bool:
        setting = self.args.metric_outputs
        if setting != "logging_steps":
            return setting == "always"
        if mode == "eval":
            return True
        if self.args.logging_strategy != "steps":
            return False
        step = self.state.global_step  # the optimizer step this micro-batch belongs to, 0-based
        if step == 0 and self.args.logging_first_step:
            return True
        logging_steps = self.state.logging_steps or self.args.logging_steps
        return logging_steps > 0 and (step + 1) % int(logging_steps) == 0

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


def _compute_dtype(model, device: torch.device) -> torch.dtype:
    """The dtype the model computes in: autocast's when it is on, else that of the input embeddings."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return _unwrap(model).get_input_embeddings().weight.dtype


def _peft_or_none(model):
    """The PEFT model under DDP/DeepSpeed wrappers, or the unwrapped model."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model
