"""Prefix sharing: the responses to one prompt packed into ONE sequence, so the prompt is forwarded once per pair.

A preference batch (TRL's `DataCollatorForPreference` layout) holds each prompt twice: `[prompt][chosen]` in row i and
`[prompt][rejected]` in row B + i. Packed, pair i becomes one row

    [prompt][chosen][p'][rejected]        (and, with more responses to the same prompt, [p'][response] per response)

where p' is a copy of the prompt's last token. A block mask keeps the responses apart: the tokens of the chosen
block attend causally to the prompt and to themselves; p' and the rejected tokens attend to the prompt WITHOUT its
last token (p' stands in for it) and causally to their own block. The position ids of p' and the rejected block
restart where the prompt ends (p' takes the last prompt position). So every response token sees exactly the keys,
values and positions it sees in its own unshared row, and the copy p' has exactly the hidden state of the prompt's
last token: the shifted next-token layout of a causal LM (hidden state t scores token t + 1) holds in the packed row
too, and both log-prob paths (the direct path and TRL's fused head) score the packed row unchanged. Prefix sharing
with a block mask is the method of Wang & Hegde, "Accelerating Direct Preference Optimization with Prefix Sharing"
(arXiv 2410.20305); this module implements it for TRL's collated batches and transformers' 4D masks.

Two ways to apply the block mask:

- Segment attention (models on `sdpa`): the trainer switches the model to `SEGMENT_ATTENTION`, an attention function
  that runs sdpa unchanged for every ordinary call and, for a packed forward (which passes the row layout as
  `selfplay_segments`), attends each row in pieces: `[prompt][chosen]` causally (`is_causal`, as an unshared row),
  then each further `[p'][response]` block against the prompt minus its last token and itself. No L x L mask is
  built and no masked-out block is computed, so the attention of a pair costs at most what its two unshared rows cost.
- A 4D mask (`PackedPrompts.attention_mask`, models on `eager`): the whole L x L block of a row is computed.

The result equals the unshared forward up to floating-point summation order (tested to 1e-5 in float32), for any
mix of left/right padding and prompt lengths, provided every layer is full causal attention (a sliding window is
applied by transformers from the 2D mask only). `SelfPlayTrainerBase` checks those conditions, and once per model that
the packed forward of a small test batch reproduces the unshared one, and falls back otherwise (with a log line):
from segment attention to the 4D mask, from the mask to the unshared forward.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

PREFIX_SHARING_MODES = ("auto", "on", "off")
# The attention implementation the trainer registers and switches `sdpa` models to (see `use_segment_attention`).
SEGMENT_ATTENTION = "trl_selfplay_sdpa"
# Attention implementations that take the packed rows: a custom 4D mask as given (transformers returns a 4D mask
# unchanged), or the row layout (segment attention).
MASK_ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager", SEGMENT_ATTENTION)

# One packed row for segment attention: (prefix, shared_end, blocks, length). Positions [0, shared_end) are the prompt
# and the first response, attended causally; each block [start, end) is a copy p' and a further response, attending
# to the first `prefix` positions (the prompt without its last token) and causally to itself; from `length` on, padding.
RowSegments = tuple[int, int, tuple[tuple[int, int], ...], int]
# The per-group tensors `pack_shared_prompt` reads.
GROUP_KEYS = ("input_ids", "attention_mask", "completion_mask")


class PrefixSharingUnavailable(ValueError):
    """The batch cannot be packed exactly (its `reason` says why); the caller runs the unshared forward."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class PackedPrompts:
    """G groups of N responses to the same N prompts, packed into N rows of length L (see the module docstring).

    `input_ids`, `position_ids` and `labels` (-100 except at the scored response tokens) are `[N, L]`;
    `segment_ids` `[N, L]` is 0 for the prompt minus its last token, 1 for the last prompt token and group 0's
    response, g + 1 for group g's copy p' and response, -1 for padding. `unpack` maps per-token outputs of the packed
    forward (`[N, L - 1]`, shifted like TRL's log-probs) back to each group's original layout `[N, T_g - 1]`.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor
    segment_ids: torch.Tensor
    # Per group: flat index into the packed `[N, L - 1]` outputs and whether the original position is scored.
    gather_index: list[torch.Tensor]
    gather_valid: list[torch.Tensor]
    # Token positions of the unshared tensors (sum over groups of N x T_g) and of the packed rows (N x L).
    unshared_positions: int
    packed_positions: int
    # The row layout segment attention reads (`RowSegments` per row), as Python ints: read once per batch.
    segments: tuple[RowSegments, ...] = ()

    @property
    def position_ratio(self) -> float:
        """Packed token positions over unshared token positions (padding included): the backbone's share of work."""
        return self.packed_positions / self.unshared_positions

    def attention_mask(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The block mask `[N, 1, L, L]`: boolean (True = attend) when `dtype` is None, else additive (0 where
        attended, the dtype's minimum elsewhere), as the `eager` attention adds it to the scores. Padding positions
        attend to themselves only, so no row of the softmax is empty."""
        seg = self.segment_ids
        length = seg.size(1)
        positions = torch.arange(length, device=seg.device)
        causal = positions[None, :] <= positions[:, None]
        keys, queries = seg[:, None, :], seg[:, :, None]
        allowed = causal & (keys >= 0) & ((keys == 0) | (keys == queries))
        allowed = allowed | torch.eye(length, dtype=torch.bool, device=seg.device)
        allowed = allowed[:, None]
        if dtype is None:
            return allowed
        return torch.zeros(allowed.shape, dtype=dtype, device=seg.device).masked_fill(~allowed, torch.finfo(dtype).min)

    def unpack(self, values: torch.Tensor | None, group: int) -> torch.Tensor | None:
        """Per-token `values` `[N, L - 1]` of the packed forward, in group `group`'s original shifted layout
        `[N, T_g - 1]`: the value of each scored response token at its original position, zero (False) elsewhere.
        Differentiable (a gather)."""
        if values is None:
            return None
        gathered = values.reshape(-1)[self.gather_index[group]]
        return gathered.masked_fill(~self.gather_valid[group], 0)


def _stack_groups(groups: Sequence[Mapping[str, torch.Tensor]], key: str, width: int) -> torch.Tensor:
    return torch.stack(
        [torch.nn.functional.pad(group[key], (0, width - group[key].size(1))) for group in groups]
    )  # [G, N, width]


def pack_shared_prompt(
    groups: Sequence[Mapping[str, torch.Tensor]], pad_to_multiple_of: int | None = None
) -> PackedPrompts:
    """Pack G ≥ 2 groups of responses to the same N prompts into N rows `[prompt][r_0][p'][r_1]…[p'][r_{G-1}]`.

    Each group is a mapping with `input_ids`, `attention_mask` and `completion_mask` of shape `[N, T_g]`, row i of
    every group holding prompt i followed by one response, padded on either side (the attention mask must be one
    contiguous run per row). The prompt of a row is everything before its first completion token. Raises
    `PrefixSharingUnavailable` when the rows of one prompt do not start with the same prompt tokens (e.g. truncation
    cut them differently), when a prompt is empty or when a row's attention mask has holes.
    """
    if len(groups) < 2:
        raise PrefixSharingUnavailable("fewer than two responses per prompt")
    num_rows = groups[0]["input_ids"].size(0)
    if any(group[key].size(0) != num_rows for group in groups for key in GROUP_KEYS):
        raise PrefixSharingUnavailable("the response groups have different numbers of rows")
    device = groups[0]["input_ids"].device
    width = max(group["input_ids"].size(1) for group in groups)
    ids = _stack_groups(groups, "input_ids", width)
    attn = _stack_groups(groups, "attention_mask", width).bool()
    comp = _stack_groups(groups, "completion_mask", width).bool() & attn
    columns = torch.arange(width, device=device)

    lengths = attn.sum(-1)  # [G, N]
    starts = torch.where(lengths > 0, attn.int().argmax(-1), 0)
    span = (columns >= starts[..., None]) & (columns < (starts + lengths)[..., None])
    if not torch.equal(span, attn):
        raise PrefixSharingUnavailable("an attention mask row is not one contiguous run of tokens")
    first_completion = torch.where(comp.any(-1), comp.int().argmax(-1), starts + lengths)
    prompt_lengths = first_completion - starts  # [G, N]
    if not (prompt_lengths == prompt_lengths[0]).all():
        raise PrefixSharingUnavailable("the responses of a prompt follow prompts of different lengths (truncation?)")
    prompt_len = prompt_lengths[0]  # [N]
    if (prompt_len < 1).any():
        raise PrefixSharingUnavailable("a row has an empty prompt")
    in_prompt = columns[None, :] < prompt_len[:, None]  # [N, width]
    prompt_tokens = ids.gather(-1, (starts[..., None] + columns).clamp(max=width - 1))
    if not ((prompt_tokens == prompt_tokens[:1]) | ~in_prompt).all():
        raise PrefixSharingUnavailable("the responses of a prompt follow different prompt tokens (truncation?)")

    # Packed layout: group 0's response starts at prompt_len; group g ≥ 1 has its copy p' at offset[g] - 1.
    response_len = lengths - prompt_len  # [G, N]
    offsets = [prompt_len]
    for g in range(1, len(groups)):
        offsets.append(offsets[-1] + response_len[g - 1] + 1)
    offsets = torch.stack(offsets)  # [G, N]
    row_length = offsets[-1] + response_len[-1]  # [N]
    length = int(row_length.max())
    if pad_to_multiple_of:
        length = math.ceil(length / pad_to_multiple_of) * pad_to_multiple_of
    q = torch.arange(length, device=device)[None, :]  # [1, L]

    group = torch.zeros((num_rows, length), dtype=torch.long, device=device)
    for g in range(1, len(groups)):
        group = torch.where(q >= (offsets[g] - 1)[:, None], g, group)
    valid = q < row_length[:, None]
    offset = offsets.T.gather(1, group)  # [N, L]: the response offset of each position's group
    start = starts.T.gather(1, group)
    plen = prompt_len[:, None]
    is_copy = (group > 0) & (q == offset - 1)
    source_group = torch.where(is_copy, 0, group)
    source_column = torch.where(
        group == 0,
        starts[0][:, None] + q,
        torch.where(is_copy, starts[0][:, None] + plen - 1, start + plen + q - offset),
    )
    source_column = torch.where(valid, source_column, 0).clamp(max=width - 1)
    rows = torch.arange(num_rows, device=device)[:, None].expand(-1, length)
    input_ids = torch.where(valid, ids[source_group, rows, source_column], 0)
    scored = valid & ~is_copy & comp[source_group, rows, source_column]
    labels = input_ids.masked_fill(~scored, -100)
    position_ids = torch.where(valid, torch.where(group == 0, q, q - offset + plen), 0)
    segment_ids = torch.where(group == 0, (q >= plen - 1).long(), group + 1)
    segment_ids = torch.where(valid, segment_ids, -1)

    # Original shifted position t of group g (token t + 1) -> packed shifted position q - 1 of the same token.
    gather_index, gather_valid = [], []
    for g, grp in enumerate(groups):
        t_g = grp["input_ids"].size(1)
        token = torch.arange(1, t_g, device=device)[None, :]  # original token positions 1..T_g-1
        if g == 0:
            packed = token - starts[0][:, None]
        else:
            packed = offsets[g][:, None] + token - starts[g][:, None] - plen
        flat = rows[:, :1] * (length - 1) + packed - 1
        is_scored = comp[g, :, 1:t_g]
        gather_index.append(torch.where(is_scored, flat, 0))
        gather_valid.append(is_scored)

    blocks = torch.stack(
        [torch.stack([offsets[g] - 1, offsets[g] + response_len[g]], -1) for g in range(1, len(groups))]
    )
    segments = tuple(
        (prefix - 1, shared_end, tuple(map(tuple, row_blocks)), row_len)
        for prefix, shared_end, row_blocks, row_len in zip(
            prompt_len.tolist(), (offsets[1] - 1).tolist(), blocks.transpose(0, 1).tolist(), row_length.tolist()
        )
    )
    return PackedPrompts(
        input_ids=input_ids,
        position_ids=position_ids,
        labels=labels,
        segment_ids=segment_ids,
        gather_index=gather_index,
        gather_valid=gather_valid,
        unshared_positions=sum(num_rows * grp["input_ids"].size(1) for grp in groups),
        packed_positions=num_rows * length,
        segments=segments,
    )


def split_pairs(inputs: Mapping[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """The chosen and rejected groups of a collated preference batch (`[2B, T]`, chosen rows first)."""
    chosen, rejected = {}, {}
    for key in GROUP_KEYS:
        chosen[key], rejected[key] = inputs[key].chunk(2, dim=0)
    return [chosen, rejected]


def mask_support_reason(model) -> str | None:
    """Why `model` (an unwrapped causal LM) cannot take the packed block mask, or None when it can: its attention
    implementation must apply a 4D mask as given, and all its layers must be full causal attention."""
    text_config = model.config.get_text_config()
    if text_config is not model.config:
        return "a multimodal model (its positions may not be 1-D)"
    impl = getattr(text_config, "_attn_implementation", None)
    if impl not in MASK_ATTENTION_IMPLEMENTATIONS:
        return f"attn_implementation={impl!r} does not take a 4D attention mask (use 'sdpa' or 'eager')"
    layer_types = getattr(text_config, "layer_types", None)
    if layer_types is not None:
        other = sorted({kind for kind in layer_types if kind != "full_attention"})
        if other:
            return f"the model has {other} layers, which a custom 4D mask would turn into full attention"
    elif getattr(text_config, "sliding_window", None) is not None:
        return "the model uses sliding-window attention, which a custom 4D mask would turn into full attention"
    return None


def segment_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    selfplay_segments: Sequence[RowSegments] | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """An attention function for transformers' `AttentionInterface` (`SEGMENT_ATTENTION`): transformers' own sdpa
    attention for every call without `selfplay_segments`; for a packed forward, each row attended in pieces (see the
    module docstring), ignoring `attention_mask`. `query` is `[N, H, L, D]`, `key`/`value` `[N, H_kv, L, D]`; returns
    `[N, L, H, D]` like sdpa, zero at padding positions."""
    if selfplay_segments is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if kwargs.get("softcap") is not None or kwargs.get("sliding_window") is not None:
        raise ValueError("Segment attention supports neither softcapping nor a sliding window.")
    sdpa = functools.partial(
        F.scaled_dot_product_attention, dropout_p=dropout, scale=scaling, enable_gqa=query.size(1) != key.size(1)
    )
    width = query.size(2)
    rows = []
    # `unbind` and `split` (not indexing) so the backward assembles each gradient once instead of zero-filling a
    # full-size tensor per slice.
    for segments, q, k, v in zip(selfplay_segments, query.unbind(0), key.unbind(0), value.unbind(0), strict=True):
        prefix, shared_end, blocks, length = segments
        sizes = [shared_end] + [end - start for start, end in blocks] + [width - length]
        q_parts, k_parts, v_parts = (x.unsqueeze(0).split(sizes, dim=2) for x in (q, k, v))
        parts = [sdpa(q_parts[0], k_parts[0], v_parts[0], is_causal=True)]
        k_prefix, v_prefix = k_parts[0][:, :, :prefix], v_parts[0][:, :, :prefix]
        for block_q, block_k, block_v in zip(q_parts[1:-1], k_parts[1:-1], v_parts[1:-1]):
            size = block_q.size(2)
            # Keys: the prompt without its last token (all visible), then the block itself (causal).
            visible = torch.ones((size, prefix + size), dtype=torch.bool, device=query.device).tril(prefix)
            block_keys, block_values = torch.cat([k_prefix, block_k], dim=2), torch.cat([v_prefix, block_v], dim=2)
            parts.append(sdpa(block_q, block_keys, block_values, attn_mask=visible))
        parts.append(torch.zeros_like(q_parts[-1]))  # padding (possibly empty)
        rows.append(torch.cat(parts, dim=2))
    return torch.cat(rows).transpose(1, 2).contiguous(), None


def use_segment_attention(model) -> bool:
    """Switch `model` (an unwrapped causal LM) from `sdpa` to `SEGMENT_ATTENTION`, which runs sdpa unchanged for every
    call but the packed forwards; True when the model now uses it. Models on another implementation, or whose code
    does not dispatch attention through transformers' `AttentionInterface`, are left as they are. The switch is not
    saved with the model (`config._attn_implementation` is not serialized)."""
    config = model.config
    if config._attn_implementation == SEGMENT_ATTENTION:
        return True
    if config._attn_implementation != "sdpa" or not model._can_set_attn_implementation():
        return False
    model.set_attn_implementation(SEGMENT_ATTENTION)
    return config._attn_implementation == SEGMENT_ATTENTION


def use_mask_attention(model) -> None:
    """Undo `use_segment_attention`: back to `sdpa` (the 4D-mask path)."""
    if model.config._attn_implementation == SEGMENT_ATTENTION:
        model.set_attn_implementation("sdpa")


# Registered by name (a new name: nothing else changes), so `attn_implementation="trl_selfplay_sdpa"` also loads.
AttentionInterface.register(SEGMENT_ATTENTION, segment_attention)
AttentionMaskInterface.register(SEGMENT_ATTENTION, sdpa_mask)
