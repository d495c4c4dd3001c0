"""Issue 7: the direct log-prob path (completion positions only) against TRL's fused LM head."""

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from trl_selfplay.trainers import SPINConfig, SPINTrainer
from trl_selfplay.trainers.forward import install_selfplay_head


def _mixed_padding_batch(tokenizer, vocab_size: int):
    """Rows with left padding, right padding and none, prompts of different lengths; labels -100 outside the
    completion."""
    generator = torch.Generator().manual_seed(0)
    pad = tokenizer.pad_token_id
    # (left pad, prompt length, completion length, right pad)
    layout = [(3, 2, 4, 0), (0, 6, 3, 0), (0, 3, 2, 4), (1, 4, 5, 0)]
    total = max(sum(row) for row in layout)
    input_ids = torch.full((len(layout), total), pad)
    attention_mask = torch.zeros((len(layout), total), dtype=torch.long)
    labels = torch.full((len(layout), total), -100)
    for i, (left, prompt, completion, _right) in enumerate(layout):
        length = prompt + completion
        tokens = torch.randint(10, vocab_size, (length,), generator=generator)
        input_ids[i, left : left + length] = tokens
        attention_mask[i, left : left + length] = 1
        labels[i, left + prompt : left + length] = tokens[prompt:]
    return input_ids, attention_mask, labels


def _logps_and_grads(model, impl, input_ids, attention_mask, labels, weights):
    model.zero_grad(set_to_none=True)
    out = model(
        input_ids=input_ids, attention_mask=attention_mask, labels=labels, selfplay_logps=impl, use_cache=False
    )
    (out.log_probs * weights).sum().backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    return out.log_probs.detach(), grads


@pytest.mark.parametrize("use_peft", [False, True])
def test_direct_and_fused_paths_agree(tiny_model_path, use_peft):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    install_selfplay_head(model)
    if use_peft:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    input_ids, attention_mask, labels = _mixed_padding_batch(tokenizer, model.config.vocab_size)
    weights = torch.randn(labels[:, 1:].shape, generator=torch.Generator().manual_seed(1))

    fused_logps, fused_grads = _logps_and_grads(model, "fused", input_ids, attention_mask, labels, weights)
    direct_logps, direct_grads = _logps_and_grads(model, "direct", input_ids, attention_mask, labels, weights)

    mask = labels[:, 1:] != -100
    assert (direct_logps[~mask] == 0).all() and (direct_logps[mask] < 0).all()
    torch.testing.assert_close(direct_logps, fused_logps, atol=1e-5, rtol=1e-5)
    # A plain full-logits computation as an independent third opinion.
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    reference = torch.log_softmax(logits, -1).gather(-1, labels[:, 1:].clamp(min=0).unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(direct_logps[mask], reference[mask], atol=1e-5, rtol=1e-5)

    assert direct_grads.keys() == fused_grads.keys() and len(direct_grads) > 0
    if use_peft:
        assert all("lora_" in name for name in direct_grads)
    for name, grad in direct_grads.items():
        torch.testing.assert_close(grad, fused_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def _trainer(model_path, tmp_path, **config):
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    dataset = Dataset.from_dict(
        {
            "prompt": ["Hello", "What is the capital of France?"],
            "chosen": [" hi", " Paris."],
            "rejected": [" dog", " no"],
        }
    )
    args = SPINConfig(
        str(tmp_path),
        per_device_train_batch_size=2,
        report_to="none",
        gradient_checkpointing=False,
        precompute_ref_log_probs=True,
        **config,
    )
    return SPINTrainer(model_path, args=args, train_dataset=dataset, processing_class=tokenizer)


def test_auto_picks_direct_on_cpu_and_fused_for_large_logits(tiny_model_path, tmp_path):
    trainer = _trainer(tiny_model_path, tmp_path)
    assert trainer.args.logprob_impl == "auto"
    assert trainer._resolve_logprob_impl(trainer.model, num_tokens=64) == "direct"
    vocab_size = trainer.model.config.vocab_size
    trainer.args.logprob_auto_max_logits_bytes = 64 * vocab_size * 4 - 1
    assert trainer._resolve_logprob_impl(trainer.model, num_tokens=64) == "fused"


def test_metric_outputs_only_on_logging_steps(tiny_model_path, tmp_path):
    trainer = _trainer(tiny_model_path, tmp_path / "a", max_steps=4, logging_steps=2)
    decisions = []
    original = trainer._want_metric_outputs

    def record(mode):
        decisions.append(original(mode))
        return decisions[-1]

    trainer._want_metric_outputs = record
    trainer.train()
    assert decisions == [False, True, False, True]
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2 and all("entropy" in entry and "mean_token_accuracy" in entry for entry in logs)

    never = _trainer(tiny_model_path, tmp_path / "b", max_steps=2, logging_steps=1, metric_outputs="never")
    never.train()
    logs = [entry for entry in never.state.log_history if "loss" in entry]
    assert len(logs) == 2 and not any("entropy" in entry for entry in logs)
    assert all("rewards/chosen" in entry for entry in logs)


def test_logit_softcapping_model_uses_fused_path(tiny_model_path, tmp_path):
    """The direct path does not apply logit scaling/softcapping: `auto` falls back to fused, `direct` refuses."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    dataset = Dataset.from_dict({"prompt": ["Hello", "Hi"], "chosen": [" hi", " yes"], "rejected": [" dog", " no"]})

    def build(impl):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
        model.config.final_logit_softcapping = 0.5  # strong enough to change every log-prob
        args = SPINConfig(
            str(tmp_path / impl),
            per_device_train_batch_size=2,
            report_to="none",
            gradient_checkpointing=False,
            precompute_ref_log_probs=True,
            logprob_impl=impl,
        )
        return SPINTrainer(model, args=args, train_dataset=dataset, processing_class=tokenizer)

    with pytest.raises(ValueError, match="softcapping"):
        build("direct")
    trainer = build("auto")
    assert trainer._resolve_logprob_impl(trainer.model, num_tokens=4) == "fused"
    # The precomputed reference used the softcapped distribution: recompute it by hand from full logits.
    example = trainer.train_dataset[0]
    ids = torch.tensor([example["prompt_ids"] + example["chosen_ids"]])
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    with torch.no_grad():
        logits = plain(input_ids=ids).logits[0, :-1]
    start = len(example["prompt_ids"]) - 1
    targets = ids[0, 1:, None]

    def sequence_logp(values):
        return torch.log_softmax(values, -1).gather(-1, targets).squeeze(-1)[start:].sum().item()

    capped = sequence_logp(0.5 * torch.tanh(logits / 0.5))
    assert abs(capped - sequence_logp(logits)) > 1e-3  # the cap matters for this model
    assert example["ref_chosen_logps"] == pytest.approx(capped, abs=1e-4)
