"""RSPO (Tang et al. 2025, "Regularized Self-Play Alignment of Large Language Models"; SPPO is its λ = 0 case) as a
drop-in `trl.DPOTrainer` (see `docs/methods.md`)."""

from __future__ import annotations

import difflib
import gc
import json
import math
import os
import textwrap
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from accelerate.logging import get_logger
from datasets import Dataset, IterableDataset
from torch.utils.data import DataLoader
from trl.data_utils import _tokenize, common_prefix_length, is_conversational
from trl.trainer.utils import create_model_from_path, global_then_local_main_first, pad

from trl_selfplay.losses import (
    FORWARD_KL_REDUCTIONS,
    RSPO_REGULARIZERS,
    forward_kl_regularizer,
    rspo_regularizer,
    sppo_loss,
)
from trl_selfplay.trainers.base import SelfPlayBatch, SelfPlayConfig, SelfPlayTrainerBase, _named_datasets
from trl_selfplay.trainers.forward import install_selfplay_head
from trl_selfplay.trainers.truncation import DataCollatorForSelfPlay, truncate_prompt_and_responses
from trl_selfplay.trainers.validation import column_names

logger = get_logger(__name__)

WIN_PROB_COLUMNS = ("chosen_win_prob", "rejected_win_prob")
ANCHOR_COLUMNS = ("anchor_chosen_logps", "anchor_rejected_logps")
# The `forward_kl` regularizer: a response sampled from μ per prompt (same format as `chosen`), μ's log-prob of it
# (precomputed once), and its tokenisation (prompt_ids[:anchor_prompt_length] + anchor_completion_ids).
ANCHOR_SAMPLE_COLUMN = "anchor_completion"
ANCHOR_SAMPLE_LOGPS_COLUMN = "anchor_completion_logps"
ANCHOR_SAMPLE_TOKEN_COLUMNS = ("anchor_completion_ids", "anchor_prompt_length")
# The policy's log-prob of the μ sample, computed in the training forward and handed to the loss with the batch.
_POLICY_ANCHOR_SAMPLE_LOGPS = "policy_anchor_completion_logps"
UPDATE_DIRECTIONS = ("sppo", "omd")


@dataclass
class RSPOConfig(SelfPlayConfig):
    r"""
    Configuration for [`RSPOTrainer`]. All fields of [`SelfPlayConfig`] / [`~trl.DPOConfig`] apply.

    Parameters:
        beta (`float`, *optional*, defaults to `0.001`):
            β = 1/η of SPPO: the log-ratio of a response is regressed onto η·(P(y ≻ π_t) − ½).
        loss_type (`list[str]`, *optional*, defaults to `["sppo"]`):
            `"sppo"` (the squared SPPO loss), optionally with `"sft"` added (weighted by `loss_weights`).
        regularizers (`dict[str, float]`, *optional*, defaults to `{}`):
            Regularizers towards the anchor μ (the initial model) and their weights λ ≥ 0, among `"reverse_kl"`,
            `"forward_kl_is"`, `"chi2"` and `"forward_kl"`, e.g. `{"reverse_kl": 0.5, "forward_kl_is": 0.1}` (the
            paper's best). The first three add λ·(mean over chosen + mean over rejected); `"forward_kl"` adds λ times
            log μ(y) − log π_θ(y) over responses y sampled from μ, one per pair, read from the dataset column
            `anchor_completion` (see [`RSPOTrainer`]), reduced per `forward_kl_reduction`. Empty = SPPO.
        forward_kl_reduction (`str`, *optional*, defaults to `"sum"`):
            How the `"forward_kl"` term reduces over the B μ samples of a batch, with d_b = log μ(y_b) − log π_θ(y_b)
            summed over the tokens of y_b and L = the longest y_b of the (per-device) batch: `"sum"` (ours):
            mean_b d_b, a per-sequence KL estimate; `"padded_token_mean"` (xiaohangt/RSPO `sppo/trainer_reg.py`):
            Σ_b d_b / (B·L), the mean over the padded B×L token block, padding counted as zeros. λ values of the
            paper's runs (e.g. 1.0) carry over only with `"padded_token_mean"`.
        log_ratio_clip (`float`, *optional*, defaults to `10.0`):
            Clip c of the log-ratio before exponentiating in `forward_kl_is` and `chi2`.
        update_direction (`str`, *optional*, defaults to `"sppo"`):
            `"sppo"`: G = P(y ≻ π_t). `"omd"`: G = P(y ≻ π_t) − τ·log(π_t(y)/μ(y)), with τ = `omd_tau`.
        omd_tau (`float`, *optional*, defaults to `0.01`):
            τ of the `"omd"` update direction (no published default; keep τ·|log π_t/μ| well below 1).
        precompute_anchor_log_probs (`bool`, *optional*, defaults to `True`):
            Compute the anchor log-prob columns `anchor_chosen_logps` / `anchor_rejected_logps` once before training
            when the dataset lacks them, so no anchor model is held during training. Without
            `anchor_model_name_or_path`, μ is the initial model, which is also the reference when `ref_model` is not
            given: the reference columns are then copied rather than recomputed.
        anchor_model_name_or_path (`str`, *optional*):
            Path or Hub id of μ when it is not the model being trained (e.g. iterations t ≥ 1 of a multi-iteration
            run, where the policy starts from π_t). Loaded only for the precompute, then freed.
        anchor_model_init_kwargs (`dict[str, Any]`, *optional*):
            Keyword arguments for loading the anchor, on top of `model_init_kwargs` (e.g. `{"revision": "<sha>"}`
            when μ is a pinned Hub checkpoint while the policy is a local one).
    """

    _method_loss_types: ClassVar[tuple[str, ...]] = ("sppo",)
    _VALID_DICT_FIELDS = SelfPlayConfig._VALID_DICT_FIELDS + ["regularizers", "anchor_model_init_kwargs"]

    beta: float = field(default=0.001, metadata={"help": "β = 1/η of SPPO (default 0.001, η = 1000)."})
    loss_type: list[str] = field(
        default_factory=lambda: ["sppo"],
        metadata={"help": "RSPO loss: 'sppo', optionally with 'sft' added (see `loss_weights`)."},
    )
    # `| str | None` lets `HfArgumentParser` take a JSON string on the command line (parsed in `__post_init__`).
    regularizers: dict[str, float] | str | None = field(
        default_factory=dict,
        metadata={
            "help": "Regularizers towards the anchor and their weights, e.g. "
            '{"reverse_kl": 0.5, "forward_kl_is": 0.1}. Kinds: reverse_kl, forward_kl_is, chi2, forward_kl (needs '
            "an `anchor_completion` column of responses sampled from the anchor)."
        },
    )
    forward_kl_reduction: str = field(
        default="sum",
        metadata={
            "help": "Reduction of the 'forward_kl' term over the batch's anchor samples: 'sum' (per-sequence sums, "
            "averaged) or 'padded_token_mean' (the original RSPO code: divided by batch size x longest sample).",
            "choices": list(FORWARD_KL_REDUCTIONS),
        },
    )
    log_ratio_clip: float = field(
        default=10.0, metadata={"help": "Clip of the log-ratio before exponentiating (forward_kl_is, chi2)."}
    )
    update_direction: str = field(
        default="sppo",
        metadata={
            "help": "'sppo': G = P(y > pi_t); 'omd': G = P - tau*log(pi_t/mu).",
            "choices": list(UPDATE_DIRECTIONS),
        },
    )
    omd_tau: float = field(default=0.01, metadata={"help": "τ of the 'omd' update direction."})
    precompute_anchor_log_probs: bool = field(
        default=True,
        metadata={"help": "Compute the anchor log-prob columns once before training when the dataset lacks them."},
    )
    anchor_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Path or Hub id of the anchor μ when it is not the model being trained."},
    )
    anchor_model_init_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={"help": "Keyword arguments for loading the anchor, on top of `model_init_kwargs`."},
    )

    def __post_init__(self):
        if self.regularizers is None:
            self.regularizers = {}
        if isinstance(self.regularizers, str):
            self.regularizers = json.loads(self.regularizers) if self.regularizers.strip() else {}
        if not isinstance(self.regularizers, dict):
            raise ValueError(
                f"`regularizers` must be a dict of kind -> weight, e.g. {{'reverse_kl': 0.5}}, got {self.regularizers!r}."
            )
        for kind, weight in self.regularizers.items():
            if kind not in RSPO_REGULARIZERS:
                close = difflib.get_close_matches(str(kind), RSPO_REGULARIZERS, n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise ValueError(
                    f"`regularizers` has an unknown kind {kind!r}.{hint} Valid kinds: {list(RSPO_REGULARIZERS)}."
                )
            if not (isinstance(weight, int | float) and math.isfinite(weight) and weight >= 0):
                raise ValueError(
                    f"`regularizers[{kind!r}]` must be a finite weight λ >= 0, got {weight!r}; use 0 or remove the "
                    "entry to disable it."
                )
        self.regularizers = {kind: float(weight) for kind, weight in self.regularizers.items()}
        if self.forward_kl_reduction not in FORWARD_KL_REDUCTIONS:
            raise ValueError(
                f"`forward_kl_reduction` must be one of {list(FORWARD_KL_REDUCTIONS)}, got "
                f"{self.forward_kl_reduction!r}: 'sum' (ours) or 'padded_token_mean' (the original RSPO code)."
            )
        if self.update_direction not in UPDATE_DIRECTIONS:
            raise ValueError(
                f"`update_direction` must be one of {list(UPDATE_DIRECTIONS)}, got {self.update_direction!r}."
            )
        for name in ("beta", "log_ratio_clip"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"`{name}` must be a finite number > 0, got {value!r}.")
        if not (isinstance(self.omd_tau, int | float) and math.isfinite(self.omd_tau) and self.omd_tau >= 0):
            raise ValueError(f"`omd_tau` must be a finite number >= 0, got {self.omd_tau!r}.")
        super().__post_init__()

    @property
    def needs_anchor_logps(self) -> bool:
        """Whether the loss reads μ's log-probs of the chosen / rejected responses."""
        return self.update_direction == "omd" or any(
            weight > 0 for kind, weight in self.regularizers.items() if kind != "forward_kl"
        )

    @property
    def needs_anchor_samples(self) -> bool:
        """Whether the loss reads responses sampled from μ (the `forward_kl` regularizer)."""
        return self.regularizers.get("forward_kl", 0.0) > 0

    @property
    def needs_anchor(self) -> bool:
        """Whether the loss needs anything computed with the anchor μ."""
        return self.needs_anchor_logps or self.needs_anchor_samples

    @property
    def anchor_columns(self) -> tuple[str, ...]:
        """The precomputed anchor columns the loss reads."""
        return (ANCHOR_COLUMNS if self.needs_anchor_logps else ()) + (
            (ANCHOR_SAMPLE_LOGPS_COLUMN,) if self.needs_anchor_samples else ()
        )


@dataclass
class DataCollatorForRSPO(DataCollatorForSelfPlay):
    """TRL's preference collator (with the optional `max_prompt_length` policy of `DataCollatorForSelfPlay`) that also
    carries per-example float columns (win probabilities, anchor log-probs) into the batch as 1-D tensors, and, when
    the examples have a tokenised μ sample (`anchor_completion_ids`), pads prompt + μ sample into `anchor_input_ids`,
    `anchor_attention_mask` and `anchor_completion_mask`, truncated like the pairs (with `max_prompt_length`: the
    same rule, the μ sample being the only response of its row)."""

    extra_columns: tuple[str, ...] = WIN_PROB_COLUMNS + ANCHOR_COLUMNS + (ANCHOR_SAMPLE_LOGPS_COLUMN,)

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        output = super().torch_call(examples)
        for name in self.extra_columns:
            if name in examples[0]:
                output[name] = torch.tensor([float(example[name]) for example in examples], dtype=torch.float32)
        if "anchor_completion_ids" in examples[0]:
            output.update(self._anchor_sample_batch(examples))
        return output

    def _anchor_sample_batch(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids, masks = [], []
        for example in examples:
            prompt = example["prompt_ids"][: example["anchor_prompt_length"]]
            completion = example["anchor_completion_ids"]
            if self.max_prompt_length is not None:
                prompt, (completion,) = truncate_prompt_and_responses(
                    prompt, [completion], max_length=self.max_length, max_prompt_length=self.max_prompt_length
                )
            ids.append(prompt + completion)
            masks.append([0] * len(prompt) + [1] * len(completion))
        if self.max_length is not None and self.max_prompt_length is None:
            keep = (
                slice(None, self.max_length) if self.truncation_mode == "keep_start" else slice(-self.max_length, None)
            )
            ids, masks = [x[keep] for x in ids], [m[keep] for m in masks]

        def padded(rows: list[list[int]], value: int) -> torch.Tensor:
            tensors = [torch.tensor(row, dtype=torch.long) for row in rows]
            return pad(tensors, padding_value=value, padding_side="right", pad_to_multiple_of=self.pad_to_multiple_of)

        return {
            "anchor_input_ids": padded(ids, self.pad_token_id),
            "anchor_attention_mask": padded([[1] * len(x) for x in ids], 0),
            "anchor_completion_mask": padded(masks, 0),
        }


def _anchor_sample_inputs(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {
        "input_ids": batch["anchor_input_ids"],
        "attention_mask": batch["anchor_attention_mask"],
        "completion_mask": batch["anchor_completion_mask"],
    }


def _tokenize_anchor_sample(example: dict[str, Any], processing_class, eos_token: str) -> dict[str, Any]:
    """Tokenise prompt + μ sample as TRL tokenises prompt + chosen; the μ sample's tokens start where they diverge
    from the example's (already tokenised) `prompt_ids`."""
    completion = example[ANCHOR_SAMPLE_COLUMN]
    if is_conversational(example):
        tools = example.get("tools")
        kwargs = {"tools": json.loads(tools) if isinstance(tools, str) else tools}
        kwargs.update(example.get("chat_template_kwargs") or {})
        full = _tokenize(processing_class, example["prompt"] + completion, **kwargs)["input_ids"]
    else:
        if not completion.endswith(eos_token):  # as TRL does for chosen / rejected
            completion += eos_token
        full = _tokenize(processing_class, example["prompt"] + completion)["input_ids"]
    prompt_length = common_prefix_length(example["prompt_ids"], full)
    return {"anchor_completion_ids": full[prompt_length:], "anchor_prompt_length": prompt_length}


class RSPOTrainer(SelfPlayTrainerBase):
    """RSPO / SPPO trainer. Dataset columns: `prompt`, `chosen` (highest-judged of the K samples), `rejected`
    (lowest-judged), `chosen_win_prob` and `rejected_win_prob` (estimated P(y ≻ π_t) in [0, 1], see
    `trl_selfplay.losses.win_probabilities`), and optionally the anchor columns `anchor_chosen_logps` /
    `anchor_rejected_logps` (else precomputed once, see `RSPOConfig.precompute_anchor_log_probs`).

    The `forward_kl` regularizer also needs `anchor_completion`: one response per prompt sampled from μ, in the
    format of `chosen` (e.g. `generate_completions(anchor, prompts, num_samples=1)`; at the first iteration, when
    π_0 = μ, any one of the self-play samples is one). μ's log-prob of it, `anchor_completion_logps`, is
    precomputed like the other anchor columns; the policy's log-prob of it takes one more forward per step.

    With `precompute_ref_log_probs=True` and the anchor columns present or precomputed, training holds ONE model.
    Logs TRL's DPO metrics plus `rspo/sppo_loss` and `rspo/reg_<kind>` for each configured regularizer.
    """

    config_class = RSPOConfig
    collator_class = DataCollatorForRSPO
    _probability_columns = WIN_PROB_COLUMNS
    _tag_names = ["trl", "trl_selfplay", "rspo"]
    _name = "RSPO"
    _paper = {
        "title": "Regularized Self-Play Alignment of Large Language Models",
        "id": "2503.00030",
        # docstyle-ignore
        "citation": textwrap.dedent("""\
            @article{tang2025rspo,
                title        = {{Regularized Self-Play Alignment of Large Language Models}},
                author       = {Tang and others},
                year         = 2025,
                eprint       = {arXiv:2503.00030},
            }"""),
    }

    def _post_init(self) -> None:
        if self.args.anchor_columns:
            self.train_dataset = self._ensure_anchor_columns(self.train_dataset, "train")
            if isinstance(self.eval_dataset, dict):
                self.eval_dataset = {k: self._ensure_anchor_columns(v, k) for k, v in self.eval_dataset.items()}
            elif self.eval_dataset is not None:
                self.eval_dataset = self._ensure_anchor_columns(self.eval_dataset, "eval")

    # -- validation, before any model work -------------------------------------------------------------------
    def _validate_datasets(self, args, train_dataset, eval_dataset) -> None:
        # The base checks emptiness, the pair columns, None values and the win probabilities' type and range.
        super()._validate_datasets(args, train_dataset, eval_dataset)
        for label, dataset in _named_datasets(train_dataset, eval_dataset).items():
            names = column_names(dataset)
            missing = [name for name in WIN_PROB_COLUMNS if name not in names]
            if missing:
                raise ValueError(
                    f"{label} lacks the column(s) {missing}. RSPO needs `chosen_win_prob` and `rejected_win_prob`, "
                    "the estimated P(y > pi_t) of each response; build them from judge preferences with "
                    "`trl_selfplay.losses.win_probabilities`."
                )
            if args.needs_anchor_samples and not any(
                name in names for name in (ANCHOR_SAMPLE_COLUMN, ANCHOR_SAMPLE_TOKEN_COLUMNS[0])
            ):
                raise ValueError(
                    f"The `forward_kl` regularizer needs responses sampled from the anchor mu, but {label} lacks the "
                    f"column `{ANCHOR_SAMPLE_COLUMN}`. Add one response per prompt sampled from mu (same format as "
                    "`chosen`, e.g. with `trl_selfplay.generation.generate_completions(anchor, prompts, "
                    "num_samples=1)`), or use the importance-sampled `forward_kl_is` instead."
                )
            if args.needs_anchor_samples and "prompt" not in names and "prompt_ids" not in names:
                raise ValueError(
                    f"{label} has an implicit prompt (no `prompt` column); with `{ANCHOR_SAMPLE_COLUMN}` the prompt "
                    "must be an explicit `prompt` column."
                )
            missing = [name for name in args.anchor_columns if name not in names]
            if missing and not args.precompute_anchor_log_probs:
                raise ValueError(
                    f"The configured regularizers / update_direction need the anchor log-probs, but {label} lacks "
                    f"the columns {missing} and `precompute_anchor_log_probs=False`. Set "
                    "precompute_anchor_log_probs=True or add the columns."
                )

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        for name in WIN_PROB_COLUMNS + ANCHOR_COLUMNS + (ANCHOR_SAMPLE_LOGPS_COLUMN, *ANCHOR_SAMPLE_TOKEN_COLUMNS):
            if name not in self._signature_columns:
                self._signature_columns.append(name)

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        dataset = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        names = column_names(dataset)
        if ANCHOR_SAMPLE_COLUMN not in names or ANCHOR_SAMPLE_TOKEN_COLUMNS[0] in names:
            return dataset
        map_kwargs: dict[str, Any] = {}
        if isinstance(dataset, Dataset):  # `IterableDataset.map` takes neither
            map_kwargs = {"num_proc": args.dataset_num_proc, "desc": f"Tokenizing anchor samples of {dataset_name}"}
        with global_then_local_main_first():
            return dataset.map(
                _tokenize_anchor_sample,
                fn_kwargs={"processing_class": processing_class, "eos_token": self._tokenizer.eos_token},
                **map_kwargs,
            )

    # -- anchor precompute -------------------------------------------------------------------------------------
    def _ensure_anchor_columns(self, dataset, name: str):
        missing = [] if dataset is None else [c for c in self.args.anchor_columns if c not in column_names(dataset)]
        if not missing:
            return dataset
        if isinstance(dataset, IterableDataset):
            raise ValueError(
                "Precomputing the anchor log-probs needs a map-style `Dataset`; pass one, or add the columns "
                f"{missing} yourself."
            )
        names = column_names(dataset)
        pairs = any(column in missing for column in ANCHOR_COLUMNS)
        if (
            pairs
            and self.args.anchor_model_name_or_path is None
            and not self._ref_model_given
            and all(column in names for column in ("ref_chosen_logps", "ref_rejected_logps"))
        ):
            # μ = the initial model = the reference (TRL's default ref): one forward pass serves both.
            logger.info(f"Anchor log-probs of the {name} dataset: copied from the reference log-probs (μ = π_0).")
            dataset = dataset.add_column("anchor_chosen_logps", list(dataset["ref_chosen_logps"]))
            dataset = dataset.add_column("anchor_rejected_logps", list(dataset["ref_rejected_logps"]))
            pairs = False
        samples = ANCHOR_SAMPLE_LOGPS_COLUMN in missing
        if not (pairs or samples):
            return dataset

        if self.args.anchor_model_name_or_path is not None:
            init_kwargs = dict(self.args.model_init_kwargs or {})
            init_kwargs.update(self.args.anchor_model_init_kwargs or {})
            init_kwargs.setdefault("dtype", self.model.dtype)
            init_kwargs.setdefault("trust_remote_code", self.args.trust_remote_code)
            anchor = create_model_from_path(self.args.anchor_model_name_or_path, **init_kwargs)
            install_selfplay_head(anchor)
            if self.is_deepspeed_enabled:
                # Under ZeRO-3 transformers loads it partitioned: only an inference engine gathers the parameters.
                from trl.models import prepare_deepspeed

                anchor = prepare_deepspeed(anchor, self.accelerator)
            else:
                anchor.to(self.accelerator.device).eval()
        elif self.is_deepspeed_enabled:
            from trl.models import prepare_deepspeed

            if self._precompute_engine is None:
                self._precompute_engine = prepare_deepspeed(self.model, self.accelerator)
            anchor = self._precompute_engine
        else:
            anchor = self.model  # the initial policy, before any training step
        columns = self._precompute_anchor_logps(anchor, dataset, name, pairs=pairs, samples=samples)
        if anchor is not self.model and anchor is not self._precompute_engine:
            del anchor
            gc.collect()
        for column, values in columns.items():
            dataset = dataset.add_column(column, values.tolist())
        return dataset

    def _precompute_anchor_logps(
        self, model, dataset, name: str, pairs: bool, samples: bool
    ) -> dict[str, torch.Tensor]:
        """μ's sequence log-probs, in one pass over the dataset: of chosen / rejected (`pairs`) and of the μ samples
        (`samples`)."""
        from tqdm.auto import tqdm

        batch_size = self.args.precompute_ref_batch_size or self.args.per_device_train_batch_size
        loader = self.accelerator.prepare(
            DataLoader(dataset, batch_size=batch_size, collate_fn=self.data_collator, shuffle=False)
        )
        results: dict[str, list[torch.Tensor]] = {}
        was_training = model.training
        model.eval()
        for batch in tqdm(
            loader,
            desc=f"Computing anchor log probs for {name} dataset",
            disable=bool(os.environ.get("TQDM_DISABLE", "")) or not self.accelerator.is_local_main_process,
        ):
            values: dict[str, torch.Tensor] = {}
            with torch.no_grad(), self.accelerator.autocast():
                if pairs:
                    # With the μ samples too: one packed row per prompt under prefix sharing.
                    extra = {ANCHOR_SAMPLE_LOGPS_COLUMN: _anchor_sample_inputs(batch)} if samples else None
                    outputs, values = self._response_logps(model, batch, extra=extra)
                    seq_len = batch["completion_mask"].size(1) - 1
                    values["anchor_chosen_logps"], values["anchor_rejected_logps"] = (
                        outputs.log_probs[:, -seq_len:].sum(dim=1).chunk(2, dim=0)
                    )
                elif samples:
                    values[ANCHOR_SAMPLE_LOGPS_COLUMN] = self._sequence_logps(
                        model, _anchor_sample_inputs(batch), paired=False
                    )
            for column, value in self.accelerator.gather_for_metrics(values).items():
                results.setdefault(column, []).append(value.float().cpu())
        model.train(was_training)
        return {column: torch.cat(parts) for column, parts in results.items()}

    # -- loss ----------------------------------------------------------------------------------------------
    def _extra_responses(self, inputs) -> dict[str, dict[str, torch.Tensor]]:
        if not self.args.needs_anchor_samples:
            return {}
        if "anchor_input_ids" not in inputs:
            raise ValueError(
                "The batch lacks the μ samples (`anchor_input_ids`) the `forward_kl` regularizer needs: a custom "
                "`data_collator` must pad them (see `DataCollatorForRSPO`), and datasets passed to `evaluate()` "
                f"need the `{ANCHOR_SAMPLE_COLUMN}` column."
            )
        # The policy's log-prob of prompt + μ sample, with gradients into the loss: in the pair's packed row under
        # prefix sharing, else one more forward.
        return {_POLICY_ANCHOR_SAMPLE_LOGPS: _anchor_sample_inputs(inputs)}

    def selfplay_loss(self, batch: SelfPlayBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        args = self.args
        columns = batch.columns
        needed = WIN_PROB_COLUMNS + args.anchor_columns
        missing = [name for name in needed if name not in columns]
        if missing:
            raise ValueError(
                f"The batch lacks {missing}. A custom `data_collator` must carry these columns (see "
                "`DataCollatorForRSPO`), and datasets passed to `evaluate()` later need the anchor columns: pass "
                "eval datasets at construction (they are precomputed then) or add the columns."
            )
        dtype = batch.policy_chosen_logps.dtype
        chosen_win_prob = columns["chosen_win_prob"].to(dtype)
        rejected_win_prob = columns["rejected_win_prob"].to(dtype)
        ref_chosen, ref_rejected = batch.ref_chosen_logps, batch.ref_rejected_logps
        anchor_chosen = anchor_rejected = None
        if args.needs_anchor_logps:
            anchor_chosen = columns["anchor_chosen_logps"].to(dtype)
            anchor_rejected = columns["anchor_rejected_logps"].to(dtype)
        target_ref_chosen, target_ref_rejected = ref_chosen, ref_rejected
        if args.update_direction == "omd":
            # G = P − τ·log(π_t/μ): the target η(G − ½) shifts by −ητ(ref − anchor), which is the same as
            # regressing against ref' = ref − ητ(ref − anchor) with the plain P (kept in [0, 1]).
            shift = (args.omd_tau / args.beta) * (ref_chosen - anchor_chosen)
            target_ref_chosen = ref_chosen - shift
            target_ref_rejected = ref_rejected - (args.omd_tau / args.beta) * (ref_rejected - anchor_rejected)
        losses = sppo_loss(
            batch.policy_chosen_logps,
            batch.policy_rejected_logps,
            target_ref_chosen,
            target_ref_rejected,
            chosen_win_prob,
            rejected_win_prob,
            beta=args.beta,
        )
        loss = losses.mean()
        metrics: dict[str, torch.Tensor | float] = {"rspo/sppo_loss": loss.detach()}
        for kind, weight in args.regularizers.items():
            if kind == "forward_kl":
                if not args.needs_anchor_samples:  # weight 0: nothing computed
                    continue
                # On μ's samples (one per pair): log μ(y) − log π_θ(y), an estimate of KL(μ ‖ π_θ), reduced per
                # `forward_kl_reduction` over the scored tokens of the samples.
                value = forward_kl_regularizer(
                    columns[_POLICY_ANCHOR_SAMPLE_LOGPS],
                    columns[ANCHOR_SAMPLE_LOGPS_COLUMN].to(dtype),
                    columns["anchor_completion_mask"].sum(dim=1),
                    reduction=args.forward_kl_reduction,
                )
            elif anchor_chosen is None:  # only zero weights configured and no anchor columns needed
                continue
            else:
                value = (
                    rspo_regularizer(
                        batch.policy_chosen_logps, anchor_chosen, kind, log_ratio_clip=args.log_ratio_clip
                    ).mean()
                    + rspo_regularizer(
                        batch.policy_rejected_logps, anchor_rejected, kind, log_ratio_clip=args.log_ratio_clip
                    ).mean()
                )
            if weight > 0:
                loss = loss + weight * value
            metrics[f"rspo/reg_{kind}"] = value.detach()
        return loss, metrics
