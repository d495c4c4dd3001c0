"""The forward of the self-play trainers: per-token log-probs of a collated preference batch through one of two
log-prob paths, and prefix sharing (one packed sequence per pair).

Log-prob path (`logprob_impl`): TRL 1.16 patches the model with `trl.trainer.utils.add_fused_lm_head`, a chunked
LM head that recomputes the vocabulary projection in backward and, off Triton devices, scores every position
(prompt and padding included), always with the metric-only outputs (entropy, mean logits, top-1) on. On CPU, and
whenever the completion logits fit in memory, projecting only the completion positions through the LM head and
taking `log_softmax` + gather is faster (`benchmarks/RESULTS.md`). `install_selfplay_head` re-patches the forward to
offer both paths and to compute the metric-only outputs only on logging steps.

Prefix sharing (`prefix_sharing`): the policy forward and the reference / anchor passes can pack each pair into one
sequence `[prompt][chosen][p'][rejected]` with a block mask (`trl_selfplay.trainers.prefix_sharing`), so the prompt
is forwarded once per pair instead of twice.
"""

from __future__ import annotations

import contextlib
import functools
import types
from collections.abc import Mapping

import torch
from accelerate.logging import get_logger
from accelerate.utils import is_peft_model
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import FusedCausalLMOutput, add_fused_lm_head, use_adapter

from trl_selfplay.trainers.prefix_sharing import (
    SEGMENT_ATTENTION,
    PackedPrompts,
    PrefixSharingUnavailable,
    mask_support_reason,
    pack_shared_prompt,
    split_pairs,
    use_mask_attention,
    use_segment_attention,
)

logger = get_logger(__name__)

_METRIC_OUTPUTS = ("log_probs", "entropy", "mean_logits", "is_top1")

_MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "position_ids", "token_type_ids")

_LOGIT_SCALE_ATTRS = (
    "final_logit_softcapping",
    "logit_scale",
    "output_multiplier",
    "lm_head_multiplier",
    "logits_scaling",
)


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


class LogProbMixin:
    """Per-token and per-sequence log-probs of a collated preference batch (`logprob_impl`, metric outputs), used by
    training, the reference precompute and the anchor passes. Mixed into `SelfPlayTrainerBase`."""

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


class PrefixSharingMixin:
    """Which batches are packed one sequence per pair (`prefix_sharing`), the packed forward and its one-time
    correctness check per model. Mixed into `SelfPlayTrainerBase`."""

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
                segments = use_segment_attention(unwrapped)
                reason = self._check_packed_forward(model)
                if reason is not None and segments:  # e.g. the model's layers do not pass `selfplay_segments` on
                    use_mask_attention(unwrapped)
                    self._log_prefix_sharing(
                        "segments-unavailable",
                        f"Segment attention is unavailable, the packed rows take a 4D mask: {reason}.",
                    )
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
        if _unwrap(model).config._attn_implementation == SEGMENT_ATTENTION:
            # The layout goes to the attention function; a mask of ones lets transformers skip building a 4D one.
            mask_kwargs = {
                "attention_mask": torch.ones_like(packed.input_ids),
                "selfplay_segments": packed.segments,
            }
        else:
            # An additive mask in the dtype of the attention scores, built once: given a boolean mask, sdpa converts it
            # in every layer (and keeps each copy for the backward); eager adds it to the scores.
            mask_kwargs = {"attention_mask": packed.attention_mask(_compute_dtype(model, packed.input_ids.device))}
        impl = self._resolve_logprob_impl(model, packed.labels[:, 1:] != -100)
        return model(
            input_ids=packed.input_ids,
            **mask_kwargs,
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
