"""Issue 15: prefix sharing — each pair packed into one row `[prompt][chosen][p'][rejected]` with a block mask gives
the log-probs and gradients of the unshared forward (float32, 1e-5), and every DPOConfig option that changes the
forward either works the same or is refused."""

import dataclasses
import logging

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import DPOConfig, DPOTrainer

from trl_selfplay import RSPOConfig, RSPOTrainer, SPINConfig, SPINTrainer
from trl_selfplay.trainers.forward import install_selfplay_head
from trl_selfplay.trainers.prefix_sharing import (
    SEGMENT_ATTENTION,
    PrefixSharingUnavailable,
    pack_shared_prompt,
    segment_attention,
    split_pairs,
)

TOL = dict(atol=1e-5, rtol=1e-5)
LOGGER = "trl_selfplay.trainers"  # the forward and the base log under it
COMMON = dict(report_to="none", gradient_checkpointing=False, save_strategy="no", seed=0, logging_steps=1)
# Prompts of different lengths in one batch; responses of different lengths.
PROMPTS = [
    "What is the capital of France?",
    "Hello",
    "How many legs does a spider have?",
    "Write a poem about the sea.",
]
CHOSEN = [" The capital of France is Paris.", " hi", " Eight.", " The sea is wide and blue."]
REJECTED = [" London", " dog cat fish tree house", " one two", " cat"]


# ---------------------------------------------------------------------------------------------------------------
# The packing, by hand
def test_packed_layout_hand_worked():
    # Pair 0: prompt [5, 6, 7], chosen [8, 9], rejected [4]; pair 1 (left-padded): prompt [3], chosen [2], rejected
    # [1, 1]. Pad id 0.
    inputs = {
        "input_ids": torch.tensor([[5, 6, 7, 8, 9], [0, 0, 0, 3, 2], [5, 6, 7, 4, 0], [0, 0, 3, 1, 1]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [0, 0, 0, 1, 1], [1, 1, 1, 1, 0], [0, 0, 1, 1, 1]]),
        "completion_mask": torch.tensor([[0, 0, 0, 1, 1], [0, 0, 0, 0, 1], [0, 0, 0, 1, 0], [0, 0, 0, 1, 1]]),
    }
    packed = pack_shared_prompt(split_pairs(inputs))
    # Row 0: [5 6 7][8 9][7'][4]; row 1: [3][2][3'][1 1], padded to 7.
    assert packed.input_ids.tolist() == [[5, 6, 7, 8, 9, 7, 4], [3, 2, 3, 1, 1, 0, 0]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 4, 2, 3], [0, 1, 0, 1, 2, 0, 0]]
    assert packed.labels.tolist() == [[-100, -100, -100, 8, 9, -100, 4], [-100, 2, -100, 1, 1, -100, -100]]
    assert packed.segment_ids.tolist() == [[0, 0, 1, 1, 1, 2, 2], [1, 1, 2, 2, 2, -1, -1]]
    assert packed.unshared_positions == 4 * 5 and packed.packed_positions == 2 * 7
    # Segment attention's layout: (prompt without its last token, end of [prompt][chosen], [p'][rejected] blocks,
    # row length). Row 0: prefix [5 6], causal [5 6 7 8 9], block [7' 4]; row 1: no prefix, [3 2], block [3' 1 1].
    assert packed.segments == ((2, 5, ((5, 7),), 7), (0, 2, ((2, 5),), 5))
    expected_row0 = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0, 0],  # the last prompt token: chosen block
            [1, 1, 1, 1, 0, 0, 0],
            [1, 1, 1, 1, 1, 0, 0],
            [1, 1, 0, 0, 0, 1, 0],  # p' sees the prompt without its last token, and itself
            [1, 1, 0, 0, 0, 1, 1],  # rejected: never the chosen block
        ],
        dtype=torch.bool,
    )
    mask = packed.attention_mask()
    assert mask.shape == (2, 1, 7, 7) and torch.equal(mask[0, 0], expected_row0)
    assert torch.equal(mask[1, 0, 5:, 5:], torch.eye(2, dtype=torch.bool))  # padding: itself only
    additive = packed.attention_mask(torch.float32)
    assert torch.equal(additive[0, 0] == 0, expected_row0)
    assert (additive[0, 0][~expected_row0] == torch.finfo(torch.float32).min).all()
    # Unpacking puts each packed shifted log-prob back at its original shifted position.
    values = torch.arange(2 * 6, dtype=torch.float32).reshape(2, 6) + 1
    assert packed.unpack(values, 0).tolist() == [[0, 0, 3, 4], [0, 0, 0, 7]]
    assert packed.unpack(values, 1).tolist() == [[0, 0, 6, 0], [0, 0, 9, 10]]
    assert pack_shared_prompt(split_pairs(inputs), pad_to_multiple_of=4).input_ids.shape == (2, 8)


@pytest.mark.parametrize(
    "changes,reason",
    [
        ([("input_ids", 1, 1, 9)], "different prompt tokens"),
        ([("completion_mask", 1, 2, 1)], "prompts of different lengths"),
        ([("completion_mask", 0, 0, 1), ("completion_mask", 1, 0, 1)], "empty prompt"),
        ([("attention_mask", 1, 1, 0)], "contiguous"),
    ],
)
def test_pack_refuses_pairs_it_cannot_pack_exactly(changes, reason):
    inputs = {  # one pair: row 0 chosen, row 1 rejected, prompt [5, 6, 7]
        "input_ids": torch.tensor([[5, 6, 7, 8], [5, 6, 7, 4]]),
        "attention_mask": torch.ones(2, 4, dtype=torch.long),
        "completion_mask": torch.tensor([[0, 0, 0, 1], [0, 0, 0, 1]]),
    }
    pack_shared_prompt(split_pairs(inputs))  # packs as it is
    for key, row, column, value in changes:
        inputs[key][row, column] = value
    with pytest.raises(PrefixSharingUnavailable, match=reason):
        pack_shared_prompt(split_pairs(inputs))


# ---------------------------------------------------------------------------------------------------------------
# The packed forward of a model: log-probs and gradients equal the unshared ones
def _pair_batch(padding_side: str, vocab_size: int) -> dict[str, torch.Tensor]:
    """3 pairs, prompts of lengths 4, 1 and 6, responses of different lengths, padded on `padding_side`."""
    generator = torch.Generator().manual_seed(0)
    layout = [(4, 3, 5), (1, 4, 2), (6, 1, 3)]  # (prompt, chosen, rejected)
    width = max(p + max(c, r) for p, c, r in layout) + 1
    rows = {key: torch.zeros((6, width), dtype=torch.long) for key in ("input_ids", "attention_mask")}
    rows["completion_mask"] = torch.zeros((6, width), dtype=torch.long)
    for i, (prompt_len, *response_lens) in enumerate(layout):
        prompt = torch.randint(10, vocab_size, (prompt_len,), generator=generator)
        for half, response_len in enumerate(response_lens):
            row, length = 3 * half + i, prompt_len + response_len
            start = width - length if padding_side == "left" else 0
            tokens = torch.cat([prompt, torch.randint(10, vocab_size, (response_len,), generator=generator)])
            rows["input_ids"][row, start : start + length] = tokens
            rows["attention_mask"][row, start : start + length] = 1
            rows["completion_mask"][row, start + prompt_len : start + length] = 1
    return rows


def _logps_and_grads(model, impl, forward_kwargs, unpack, weights):
    model.zero_grad(set_to_none=True)
    out = model(**forward_kwargs, selfplay_logps=impl, use_cache=False)
    log_probs = unpack(out.log_probs)
    (log_probs * weights).sum().backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    return log_probs.detach(), grads


@pytest.mark.parametrize(
    "attn,padding_side,impl,use_peft",
    [
        ("sdpa", "right", "direct", False),
        ("sdpa", "left", "direct", False),
        ("sdpa", "right", "fused", False),
        ("sdpa", "left", "fused", False),
        ("eager", "left", "direct", False),
        ("eager", "right", "fused", False),
        ("sdpa", "left", "direct", True),
        ("sdpa", "right", "fused", True),
        (SEGMENT_ATTENTION, "left", "direct", False),
        (SEGMENT_ATTENTION, "right", "fused", False),
        (SEGMENT_ATTENTION, "right", "direct", True),
    ],
)
def test_packed_forward_matches_unshared(tiny_model_path, attn, padding_side, impl, use_peft):
    """The 4D mask (sdpa, eager) and segment attention (the row layout as `selfplay_segments`) give the unshared
    log-probs and gradients."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32, attn_implementation=attn)
    install_selfplay_head(model)
    if use_peft:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    rows = _pair_batch(padding_side, model.config.vocab_size)
    completion = rows["completion_mask"][:, 1:].bool()
    weights = torch.randn(completion.shape, generator=torch.Generator().manual_seed(1))

    unshared_kwargs = {
        "input_ids": rows["input_ids"],
        "attention_mask": rows["attention_mask"],
        "labels": rows["input_ids"].masked_fill(rows["completion_mask"] == 0, -100),
    }
    unshared, unshared_grads = _logps_and_grads(
        model, impl, unshared_kwargs, lambda x: x.masked_fill(~completion, 0), weights
    )

    packed = pack_shared_prompt(split_pairs(rows))
    assert packed.input_ids.shape[0] == 3  # one row per pair
    packed_kwargs = {
        "input_ids": packed.input_ids,
        "attention_mask": packed.attention_mask(None if attn == "sdpa" else torch.float32),
        "position_ids": packed.position_ids,
        "labels": packed.labels,
    }
    if attn == SEGMENT_ATTENTION:  # no mask at all: the layout alone keeps the responses apart
        packed_kwargs.update(attention_mask=torch.ones_like(packed.input_ids), selfplay_segments=packed.segments)
    shared, shared_grads = _logps_and_grads(
        model, impl, packed_kwargs, lambda x: torch.cat([packed.unpack(x, 0), packed.unpack(x, 1)]), weights
    )

    assert (shared[completion] < 0).all() and (shared[~completion] == 0).all()
    torch.testing.assert_close(shared.sum(1), unshared.sum(1), **TOL)  # per-sequence log-probs
    torch.testing.assert_close(shared, unshared, **TOL)  # and per token
    assert shared_grads.keys() == unshared_grads.keys() and len(shared_grads) > 0
    if use_peft:
        assert all("lora_" in name for name in shared_grads)
    for name, grad in shared_grads.items():
        torch.testing.assert_close(grad, unshared_grads[name], **TOL, msg=name)


@pytest.mark.parametrize("kv_heads", [4, 2])  # multi-head and grouped-query attention
def test_segment_attention_equals_the_block_mask(kv_heads):
    """`segment_attention` on three responses per prompt, mixed padding and `pad_to_multiple_of`, against sdpa with
    the packed 4D block mask (the hand-checked mask above): same outputs at every real position, zero at padding,
    same gradients."""
    generator = torch.Generator().manual_seed(0)
    rows = _pair_batch("left", 50)
    extra = {key: value[:3].clone() for key, value in rows.items()}  # a third response: the chosen rows again
    packed = pack_shared_prompt([*split_pairs(rows), extra], pad_to_multiple_of=8)
    assert [len(blocks) for _, _, blocks, _ in packed.segments] == [2, 2, 2]
    num_rows, length = packed.input_ids.shape
    heads, dim = 4, 8
    query = torch.randn(num_rows, heads, length, dim, generator=generator, requires_grad=True)
    key, value = (torch.randn(num_rows, kv_heads, length, dim, generator=generator, requires_grad=True) for _ in "kv")
    weights = torch.randn(num_rows, length, heads, dim, generator=generator)
    real = (packed.segment_ids >= 0)[:, :, None, None]

    got, _ = segment_attention(torch.nn.Module(), query, key, value, None, selfplay_segments=packed.segments)
    got_grads = torch.autograd.grad((got * weights * real).sum(), (query, key, value))
    repeat = heads // kv_heads
    expected = torch.nn.functional.scaled_dot_product_attention(
        query, key.repeat_interleave(repeat, 1), value.repeat_interleave(repeat, 1), attn_mask=packed.attention_mask()
    ).transpose(1, 2)
    expected_grads = torch.autograd.grad((expected * weights * real).sum(), (query, key, value))

    assert got.shape == (num_rows, length, heads, dim)
    torch.testing.assert_close(got * real, expected * real, **TOL)
    assert (got.masked_select(~real) == 0).all() and (~real).any()
    for got_grad, expected_grad in zip(got_grads, expected_grads):
        torch.testing.assert_close(got_grad, expected_grad, **TOL)


def test_segment_attention_is_sdpa_without_segments(tiny_model_path):
    """Every call that does not carry the layout (generation, the unshared forward) is transformers' sdpa, with its
    mask; the switch is not saved with the model."""
    sdpa = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32, attn_implementation="sdpa")
    segments = AutoModelForCausalLM.from_pretrained(
        tiny_model_path, dtype=torch.float32, attn_implementation=SEGMENT_ATTENTION
    )
    rows = _pair_batch("left", sdpa.config.vocab_size)
    inputs = {"input_ids": rows["input_ids"], "attention_mask": rows["attention_mask"]}
    torch.testing.assert_close(segments(**inputs).logits, sdpa(**inputs).logits, atol=0, rtol=0)
    generated = [m.generate(**inputs, max_new_tokens=4, do_sample=False) for m in (sdpa, segments)]
    assert torch.equal(*generated)
    assert segments.config.to_dict().get("_attn_implementation_internal") is None


# ---------------------------------------------------------------------------------------------------------------
# Trainers: prefix_sharing="on" and "off" give the same reference columns, step-1 gradients and logged values
class _FirstGradients(TrainerCallback):
    def __init__(self):
        self.grads = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.grads is None:
            self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _record_rows(trainer) -> list[tuple[int, ...]]:
    """Shapes of the `input_ids` every backbone forward of the policy receives from now on."""
    model = trainer.model
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    shapes = []
    model.base_model.register_forward_pre_hook(
        lambda module, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
    )
    return shapes


def _spin(model_path, out_dir, dataset=None, peft_config=None, **config):
    args = SPINConfig(
        str(out_dir),
        per_device_train_batch_size=4,
        max_steps=1,
        **{**COMMON, "max_grad_norm": 0.0, "learning_rate": 1e-3, "precompute_ref_log_probs": True, **config},
    )
    capture = _FirstGradients()
    trainer = SPINTrainer(
        model_path,
        args=args,
        train_dataset=dataset or Dataset.from_dict({"prompt": PROMPTS, "chosen": CHOSEN, "rejected": REJECTED}),
        processing_class=AutoTokenizer.from_pretrained(model_path),
        callbacks=[capture],
        peft_config=peft_config,
    )
    return trainer, capture


def _assert_same_run(shared, unshared, shared_capture, unshared_capture, columns=("ref_chosen_logps",)):
    for column in (*columns, "ref_rejected_logps"):
        if column not in shared.train_dataset.column_names:  # a reference computed during training
            continue
        torch.testing.assert_close(
            torch.tensor(shared.train_dataset[column]), torch.tensor(unshared.train_dataset[column]), **TOL
        )
    logs_shared, logs_unshared = shared.state.log_history[0], unshared.state.log_history[0]
    for key in ("loss", "logps/chosen", "logps/rejected", "rewards/margins"):
        assert logs_shared[key] == pytest.approx(logs_unshared[key], rel=1e-5, abs=1e-6), key
    grads, expected = shared_capture.grads, unshared_capture.grads
    assert grads.keys() == expected.keys() and len(grads) > 0
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected[name], **TOL, msg=name)


@pytest.mark.parametrize(
    "variant,config",
    [
        ("defaults", {}),
        ("fused", {"logprob_impl": "fused"}),
        ("gradient_checkpointing", {"gradient_checkpointing": True}),
        ("pad_to_multiple_of", {"pad_to_multiple_of": 8}),
        ("max_length_keep_start", {"max_length": 14}),  # cuts the longer responses: still one prompt per pair
        ("max_prompt_length", {"max_length": 14, "max_prompt_length": 6}),  # the originals' prompt-first cut
        ("peft_resident_reference", {"precompute_ref_log_probs": False}),
        ("eager", {"model_init_kwargs": {"attn_implementation": "eager"}}),
    ],
)
def test_spin_step_identical_with_and_without_prefix_sharing(tiny_model_path, tmp_path, caplog, variant, config):
    peft_config = None
    if variant.startswith("peft"):
        from peft import LoraConfig

        peft_config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    caplog.set_level(logging.INFO, logger=LOGGER)
    shared, shared_grads = _spin(
        tiny_model_path, tmp_path / "on", prefix_sharing="on", peft_config=peft_config, **config
    )
    if config.get("precompute_ref_log_probs", True):  # already packed in the reference pass
        assert "prefix_sharing='on' packs each pair into one row" in caplog.text
    unshared, unshared_grads = _spin(
        tiny_model_path, tmp_path / "off", prefix_sharing="off", peft_config=peft_config, **config
    )
    shared_rows, unshared_rows = _record_rows(shared), _record_rows(unshared)
    shared.train()
    unshared.train()
    if variant == "peft_resident_reference":
        # The model's first forward happens in training: the one-time check (unshared, then packed) on its
        # synthetic batch of 2 pairs comes first.
        assert shared_rows[:2] == [(4, 6), (2, 9)]
        shared_rows = shared_rows[2:]
    # One row per pair (the PEFT reference pass included), against two unshared rows.
    assert shared_rows and all(shape[0] == 4 for shape in shared_rows)
    assert unshared_rows and all(shape[0] == 8 for shape in unshared_rows)
    assert len(shared_rows) == (2 if variant == "peft_resident_reference" else 1)
    assert caplog.text.count("prefix_sharing='on' packs each pair into one row") == 1
    # sdpa models are switched to segment attention (no 4D mask); eager ones take the mask.
    expected_attention = "eager" if variant == "eager" else SEGMENT_ATTENTION
    assert shared.model.config._attn_implementation == expected_attention
    if variant == "pad_to_multiple_of":
        assert all(shape[1] % 8 == 0 for shape in shared_rows + unshared_rows)
    if variant == "max_length_keep_start":
        data = shared.train_dataset
        assert len(data) == 4 and max(len(p + c) for p, c in zip(data["prompt_ids"], data["chosen_ids"])) > 14
        assert unshared_rows[0][1] == 14  # TRL's truncation is honoured
    _assert_same_run(shared, unshared, shared_grads, unshared_grads)


def test_bf16_autocast_packs(tiny_model_path, tmp_path, caplog):
    """`bf16=True` with a float32 model computes in bfloat16 under autocast: the packed passes run (the one-time check
    compares at bfloat16 tolerance, no fallback) and agree with the unshared ones to bfloat16 precision."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    shared, _ = _spin(tiny_model_path, tmp_path / "on", prefix_sharing="on", bf16=True, use_cpu=True)
    unshared, _ = _spin(tiny_model_path, tmp_path / "off", prefix_sharing="off", bf16=True, use_cpu=True)
    assert "prefix_sharing='on' packs each pair into one row" in caplog.text
    assert "runs the unshared forward" not in caplog.text
    rows = _record_rows(shared)
    shared.train()
    assert [shape[0] for shape in rows] == [4]
    for column in ("ref_chosen_logps", "ref_rejected_logps"):
        values, expected = torch.tensor(shared.train_dataset[column]), torch.tensor(unshared.train_dataset[column])
        torch.testing.assert_close(values, expected, atol=0.5, rtol=0.02)


def test_rspo_packs_pair_and_anchor_sample_in_one_row(tiny_model_path, perturbed_model_path, tmp_path, caplog):
    """RSPO with a forward-KL (μ sample per pair) and a reverse-KL regularizer, μ loaded by path: the anchor pass
    and each policy forward score prompt + chosen + rejected + μ sample in ONE row; same columns, loss, gradients."""
    dataset = Dataset.from_dict(
        {
            "prompt": PROMPTS,
            "chosen": CHOSEN,
            "rejected": REJECTED,
            "chosen_win_prob": [0.8, 0.7, 0.9, 0.6],
            "rejected_win_prob": [0.2, 0.4, 0.1, 0.3],
            "anchor_completion": [" Paris!", " hi there", " It has eight legs.", " Waves."],
        }
    )
    caplog.set_level(logging.INFO, logger=LOGGER)
    runs = {}
    for mode in ("on", "off"):
        args = RSPOConfig(
            str(tmp_path / mode),
            per_device_train_batch_size=4,
            max_steps=1,
            max_grad_norm=0.0,
            learning_rate=1e-3,
            beta=0.01,
            regularizers={"forward_kl": 1.0, "reverse_kl": 0.5},
            anchor_model_name_or_path=tiny_model_path,
            precompute_ref_log_probs=True,
            prefix_sharing=mode,
            **COMMON,
        )
        capture = _FirstGradients()
        trainer = RSPOTrainer(
            perturbed_model_path,
            args=args,
            train_dataset=dataset,
            processing_class=AutoTokenizer.from_pretrained(tiny_model_path),
            callbacks=[capture],
        )
        rows = _record_rows(trainer)
        trainer.train()
        runs[mode] = (trainer, capture, rows)
    assert "packs each pair and its `anchor_completion_logps` into one row" in caplog.text  # the anchor pass
    assert "packs each pair and its `policy_anchor_completion_logps` into one row" in caplog.text  # training
    (shared, shared_grads, shared_rows), (unshared, unshared_grads, unshared_rows) = runs["on"], runs["off"]
    assert [shape[0] for shape in shared_rows] == [4]  # one forward: 4 rows of prompt + 3 responses
    assert [shape[0] for shape in unshared_rows] == [8, 4]  # pairs, then the μ samples
    columns = ("ref_chosen_logps", "anchor_chosen_logps", "anchor_rejected_logps", "anchor_completion_logps")
    _assert_same_run(shared, unshared, shared_grads, unshared_grads, columns=columns)
    for key in ("rspo/reg_forward_kl", "rspo/reg_reverse_kl", "rspo/sppo_loss"):
        assert shared.state.log_history[0][key] == pytest.approx(unshared.state.log_history[0][key], rel=1e-5)
    assert abs(shared.state.log_history[0]["rspo/reg_forward_kl"]) > 1e-3  # policy ≠ μ: a non-trivial value


# ---------------------------------------------------------------------------------------------------------------
# Where packing does not apply: the unshared forward runs, with one log line saying why
def test_auto_packs_long_prompts_only(tiny_model_path, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    long_prompt = " ".join(["the sea is wide and blue"] * 6)
    short_responses = Dataset.from_dict({"prompt": [long_prompt] * 4, "chosen": [" yes"] * 4, "rejected": [" no"] * 4})
    trainer, _ = _spin(tiny_model_path, tmp_path / "long", dataset=short_responses)
    assert trainer.args.prefix_sharing == "auto"
    assert "prefix_sharing='auto' packs each pair into one row" in caplog.text
    caplog.clear()
    long_responses = Dataset.from_dict(
        {"prompt": ["Hi"] * 4, "chosen": [" " + long_prompt] * 4, "rejected": [" " + long_prompt + " no"] * 4}
    )
    trainer, _ = _spin(tiny_model_path, tmp_path / "short", dataset=long_responses)
    rows = _record_rows(trainer)
    trainer.train()
    assert [shape[0] for shape in rows] == [8]
    assert "prefix_sharing='auto' runs the unshared forward: the packed rows would hold" in caplog.text
    assert caplog.text.count("runs the unshared forward") == 1  # logged once, not per batch


def test_keep_end_truncation_falls_back_per_batch(tiny_model_path, tmp_path, caplog):
    """`truncation_mode="keep_end"` cuts each prompt + response from the left, so a pair's two rows start with
    different prompt tokens: those batches run unshared (logged), with TRL's truncation honoured."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    config = dict(max_length=8, truncation_mode="keep_end")
    with pytest.warns(FutureWarning, match="keep_end"):
        shared, shared_grads = _spin(tiny_model_path, tmp_path / "on", prefix_sharing="on", **config)
        unshared, unshared_grads = _spin(tiny_model_path, tmp_path / "off", prefix_sharing="off", **config)
    assert "runs the unshared forward: the responses of a prompt follow" in caplog.text
    rows = _record_rows(shared)
    shared.train()
    unshared.train()
    assert [shape for shape in rows] == [(8, 8)]
    _assert_same_run(shared, unshared, shared_grads, unshared_grads)


def test_attention_without_4d_masks_falls_back(tiny_model_path, tmp_path, caplog):
    """An attention implementation that is not known to apply a custom 4D mask is never given one."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    AttentionInterface.register("selfplay_test_attention", sdpa_attention_forward)
    caplog.set_level(logging.INFO, logger=LOGGER)
    trainer, _ = _spin(
        tiny_model_path,
        tmp_path,
        prefix_sharing="on",
        model_init_kwargs={"attn_implementation": "selfplay_test_attention"},
    )
    rows = _record_rows(trainer)
    trainer.train()
    assert [shape[0] for shape in rows] == [8]
    assert "attn_implementation='selfplay_test_attention' does not take a 4D attention mask" in caplog.text


def test_layers_that_drop_the_segments_fall_back_to_the_mask(tiny_model_path, tmp_path, caplog, monkeypatch):
    """A model whose layers do not pass `selfplay_segments` on to the attention gets plain causal attention over the
    packed row: the one-time check catches it, and the packed rows take the 4D mask instead."""
    from transformers import AttentionInterface

    def drops_segments(*args, selfplay_segments=None, **kwargs):
        return segment_attention(*args, **kwargs)

    monkeypatch.setitem(AttentionInterface._global_mapping, SEGMENT_ATTENTION, drops_segments)
    caplog.set_level(logging.INFO, logger=LOGGER)
    shared, shared_grads = _spin(tiny_model_path, tmp_path / "on", prefix_sharing="on")
    unshared, unshared_grads = _spin(tiny_model_path, tmp_path / "off", prefix_sharing="off")
    rows = _record_rows(shared)
    shared.train()
    unshared.train()
    assert "Segment attention is unavailable, the packed rows take a 4D mask" in caplog.text
    assert shared.model.config._attn_implementation == "sdpa"
    assert [shape[0] for shape in rows] == [4]
    _assert_same_run(shared, unshared, shared_grads, unshared_grads)


def test_model_that_ignores_the_mask_is_caught_by_the_check(tiny_model_path, tmp_path, caplog, monkeypatch):
    """An 'sdpa' attention that ignores the given mask (plain causal attention), in a model whose layers also drop
    the segments, passes the static checks; the one-time check catches both and the trainer falls back to the
    unshared forward instead of training on wrong values."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    def causal_only(module, query, key, value, attention_mask, **kwargs):
        return sdpa_attention_forward(module, query, key, value, None, **kwargs)

    def drops_segments(*args, selfplay_segments=None, **kwargs):
        return causal_only(*args, **kwargs)

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, "sdpa", causal_only)
    monkeypatch.setitem(AttentionInterface._global_mapping, SEGMENT_ATTENTION, drops_segments)
    caplog.set_level(logging.INFO, logger=LOGGER)
    trainer, _ = _spin(tiny_model_path, tmp_path, prefix_sharing="on")
    rows = _record_rows(trainer)
    trainer.train()
    assert [shape[0] for shape in rows] == [8]
    assert "Segment attention is unavailable" in caplog.text
    assert "the packed forward differs from the unshared one" in caplog.text


# ---------------------------------------------------------------------------------------------------------------
# DPOConfig fields that change the forward: refused at construction, or the same behaviour as trl.DPOTrainer
def test_config_checks():
    with pytest.raises(ValueError, match="prefix_sharing"):
        SPINConfig("out", prefix_sharing="yes")
    with pytest.raises(ValueError, match="prefix_sharing_auto_max_ratio"):
        SPINConfig("out", prefix_sharing_auto_max_ratio=0.0)
    # TRL 1.16 ignores padding_free (a warning, then padding); ours refuses it.
    with pytest.raises(ValueError, match="padding_free=True` is not supported.*prefix_sharing"):
        RSPOConfig("out", padding_free=True)
    assert SPINConfig("out").prefix_sharing == "auto"


@pytest.mark.parametrize(
    "name,value",
    [("label_smoothing", 0.1), ("discopop_tau", 0.1), ("f_alpha_divergence_coef", 0.9), ("ld_alpha", 0.5)],
)
def test_dpo_loss_options_are_refused_not_ignored(name, value):
    """Options of TRL's DPO losses, which the self-play losses do not read, are refused at construction."""
    for config_cls in (SPINConfig, RSPOConfig):
        with pytest.raises(ValueError, match=f"`{name}` is a DPO-specific option .* leave it at its default"):
            config_cls("out", **{name: value})
    default = next(field.default for field in dataclasses.fields(DPOConfig) if field.name == name)
    assert getattr(SPINConfig("out", **{name: default}), name) == default  # TRL's default is accepted


def test_use_liger_kernel_behaves_as_in_dpo_trainer(tiny_model_path, tmp_path):
    """TRL applies Liger's layer kernels (which keep the forward's inputs and outputs) through `transformers.Trainer`;
    our trainers inherit that path unchanged, so they fail or succeed exactly where `DPOTrainer` does."""
    from transformers.utils import is_liger_kernel_available

    if is_liger_kernel_available():
        pytest.skip("liger-kernel is installed: its kernels need a GPU")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    dataset = Dataset.from_dict({"prompt": PROMPTS, "chosen": CHOSEN, "rejected": REJECTED})
    config = dict(report_to="none", use_liger_kernel=True, precompute_ref_log_probs=True, gradient_checkpointing=False)
    errors = []
    for trainer_cls, config_cls in ((DPOTrainer, DPOConfig), (SPINTrainer, SPINConfig)):
        with pytest.warns(FutureWarning, match="use_liger_kernel"):
            trainer = trainer_cls(
                tiny_model_path,
                args=config_cls(str(tmp_path / trainer_cls.__name__), bf16=False, **config),
                train_dataset=dataset,
                processing_class=tokenizer,
            )
        with pytest.raises(ImportError) as error:  # `Trainer.train` applies the kernels
            trainer.train()
        errors.append(str(error.value))
    assert "liger-kernel" in errors[0] and errors[0] == errors[1]
