"""Issue 3: SPINTrainer, IRISTrainer and RSPOTrainer as drop-in TRL trainers (CPU, tiny local model)."""

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer

from trl_selfplay import IRISConfig, IRISTrainer, RSPOConfig, RSPOTrainer, SPINConfig, SPINTrainer
from trl_selfplay.losses import iris_loss, rspo_regularizer, space_loss, spin_loss, sppo_loss

PROMPTS = ["What is the capital of France?", "How many legs does a spider have?", "Hello", "Write a poem."]
REAL = [" The capital of France is Paris.", " Eight.", " hello thank you", " The sea is wide and blue."]
GENERATED = [" London red green", " one two three four", " dog", " cat fish tree house"]
WIN_PROBS = {"chosen_win_prob": [0.8, 0.7, 0.9, 0.6], "rejected_win_prob": [0.2, 0.4, 0.1, 0.3]}

COMMON = dict(report_to="none", gradient_checkpointing=False, save_strategy="no", seed=0)


def _dataset(conversational: bool = False, with_win_probs: bool = True) -> Dataset:
    if conversational:
        data = {
            "prompt": [[{"role": "user", "content": p}] for p in PROMPTS],
            "chosen": [[{"role": "assistant", "content": c.strip()}] for c in REAL],
            "rejected": [[{"role": "assistant", "content": r.strip()}] for r in GENERATED],
        }
    else:
        data = {"prompt": PROMPTS, "chosen": REAL, "rejected": GENERATED}
    if with_win_probs:
        data.update(WIN_PROBS)
    return Dataset.from_dict(data)


TRAINERS = {
    "spin": (SPINTrainer, SPINConfig, {}),
    "iris": (IRISTrainer, IRISConfig, {"alpha": 0.5}),
    # beta 0.01 keeps the regression targets η(P − ½) within reach of a tiny model in 20 steps.
    "rspo": (RSPOTrainer, RSPOConfig, {"beta": 0.01, "regularizers": {"reverse_kl": 0.5, "forward_kl_is": 0.1}}),
}


def _make(name, model_path, tmp_path, dataset=None, eval_dataset=None, **overrides):
    trainer_cls, config_cls, defaults = TRAINERS[name]
    config = {
        **COMMON,
        "per_device_train_batch_size": 4,
        "precompute_ref_log_probs": True,
        "learning_rate": 1e-3,
        "logging_steps": 1,
        **defaults,
        **overrides,
    }
    args = config_cls(str(tmp_path / name), **config)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    return trainer_cls(
        model_path,
        args=args,
        train_dataset=dataset or _dataset(),
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
    )


def _losses(trainer):
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


# ---------------------------------------------------------------------------------------------------------------
# Config validation: before any model work (a non-existent model path proves nothing was loaded).
def test_iris_rejects_non_positive_alpha():
    with pytest.raises(ValueError, match="alpha"):
        IRISConfig("out", alpha=0.0)
    with pytest.raises(ValueError, match="alpha"):
        IRISConfig("out", alpha=-1.0)


def test_rspo_rejects_unknown_regularizer_with_suggestion_and_negative_weight():
    with pytest.raises(ValueError, match="Did you mean 'reverse_kl'"):
        RSPOConfig("out", regularizers={"reverse_kll": 0.5})
    with pytest.raises(ValueError, match=r"regularizers\['chi2'\].*>= 0"):
        RSPOConfig("out", regularizers={"chi2": -0.1})
    assert RSPOConfig("out", regularizers='{"reverse_kl": 0.5}').regularizers == {"reverse_kl": 0.5}


def test_loss_type_validated_per_trainer():
    with pytest.raises(ValueError, match="loss_type"):
        SPINConfig("out", loss_type="renyi")
    with pytest.raises(ValueError, match="exactly one"):
        IRISConfig("out", loss_type=["renyi", "space"])
    assert IRISConfig("out", loss_type=["space", "sft"], loss_weights=[1.0, 0.5]).loss_type == ["space", "sft"]
    if not torch.cuda.is_available():
        assert not SPINConfig("out").bf16  # CPU-only machine: TRL's bf16 default is turned off
    assert SPINConfig("out", bf16=True, use_cpu=True).bf16 is True  # an explicit choice is kept


def test_rspo_data_errors_before_model_loading(tmp_path):
    missing_model = str(tmp_path / "does-not-exist")
    with pytest.raises(ValueError, match="rejected_win_prob"):
        RSPOTrainer(
            missing_model,
            args=RSPOConfig(str(tmp_path), **COMMON),
            train_dataset=_dataset().remove_columns("rejected_win_prob"),
        )
    bad = _dataset().remove_columns("chosen_win_prob").add_column("chosen_win_prob", [0.5, 1.5, 0.2, 0.1])
    with pytest.raises(ValueError, match=r"chosen_win_prob.*\[0, 1\]"):
        RSPOTrainer(missing_model, args=RSPOConfig(str(tmp_path), **COMMON), train_dataset=bad)
    no_anchor = RSPOConfig(str(tmp_path), regularizers={"chi2": 0.1}, precompute_anchor_log_probs=False, **COMMON)
    with pytest.raises(ValueError, match="precompute_anchor_log_probs"):
        RSPOTrainer(missing_model, args=no_anchor, train_dataset=_dataset())


# ---------------------------------------------------------------------------------------------------------------
# Drop-in training
@pytest.mark.parametrize("name", list(TRAINERS))
def test_loss_decreases_on_fixed_batch_and_params_change(name, tiny_model_path, tmp_path):
    trainer = _make(name, tiny_model_path, tmp_path, max_steps=20)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    losses = _losses(trainer)
    assert len(losses) == 20
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
    changed = [n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])]
    assert len(changed) == len(before)
    assert trainer.ref_model is None  # precomputed reference: one model resident
    logs = trainer.state.log_history[0]
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen"):
        assert key in logs
    expected = {
        "spin": ("rewards/real", "rewards/generated"),
        "iris": ("iris/alpha", "iris/objective", "iris/ess_real", "iris/ess_generated"),
        "rspo": ("rspo/sppo_loss", "rspo/reg_reverse_kl", "rspo/reg_forward_kl_is"),
    }[name]
    assert all(key in logs for key in expected), logs


@pytest.mark.parametrize("name", list(TRAINERS))
def test_conversational_dataset_trains_and_evaluates(name, tiny_model_path, tmp_path):
    data = _dataset(conversational=True)
    trainer = _make(name, tiny_model_path, tmp_path, dataset=data, eval_dataset=data, max_steps=2)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert all(torch.isfinite(torch.tensor(_losses(trainer))))
    assert any(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())
    metrics = trainer.evaluate()
    assert torch.isfinite(torch.tensor(metrics["eval_loss"]))
    # After two steps towards the annotated responses, the eval margins are positive.
    assert metrics["eval_rewards/margins"] > 0 and "eval_entropy" in metrics


# ---------------------------------------------------------------------------------------------------------------
# Logged loss == pure function of losses.py on independently recomputed log-probs
def _recompute_logps(model_path, trainer):
    """Summed completion log-probs of chosen/rejected from a fresh copy of the initial model, with full logits."""
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    results = {"chosen": [], "rejected": []}
    with torch.no_grad():
        for example in trainer.train_dataset:
            for kind in ("chosen", "rejected"):
                ids = torch.tensor([example["prompt_ids"] + example[f"{kind}_ids"]])
                logits = model(input_ids=ids).logits[0, :-1]
                token_logps = torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None]).squeeze(-1)
                results[kind].append(token_logps[len(example["prompt_ids"]) - 1 :].sum())
    return torch.stack(results["chosen"]), torch.stack(results["rejected"])


@pytest.mark.parametrize(
    "name,overrides",
    [
        ("spin", {"loss_type": ["hinge", "sft"], "loss_weights": [1.0, 0.5]}),
        ("iris", {"alpha": 2.0}),
        ("iris", {"loss_type": "space", "space_mu": 2.0}),
        ("rspo", {"update_direction": "omd", "omd_tau": 0.002}),
    ],
)
def test_logged_loss_matches_pure_function(name, overrides, tiny_model_path, perturbed_model_path, tmp_path):
    dataset = _dataset()
    if name == "rspo":  # caller-supplied anchor log-probs, different from the reference
        dataset = dataset.add_column("anchor_chosen_logps", [-30.0, -20.0, -25.0, -40.0])
        dataset = dataset.add_column("anchor_rejected_logps", [-35.0, -30.0, -20.0, -45.0])
    trainer_cls, config_cls, defaults = TRAINERS[name]
    config = {**COMMON, "per_device_train_batch_size": 4, "precompute_ref_log_probs": True, "max_steps": 1}
    args = config_cls(str(tmp_path), logging_steps=1, **{**defaults, **config, **overrides})
    trainer = trainer_cls(
        perturbed_model_path,
        ref_model=AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32),
        args=args,
        train_dataset=dataset,
        processing_class=AutoTokenizer.from_pretrained(tiny_model_path),
    )
    trainer.train()  # the logged loss of step 1 is computed before the optimizer step
    logged = trainer.state.log_history[0]
    policy_c, policy_r = _recompute_logps(perturbed_model_path, trainer)
    ref_c, ref_r = _recompute_logps(tiny_model_path, trainer)
    assert (policy_c - ref_c).abs().min() > 1e-2  # a non-trivial point of every objective
    torch.testing.assert_close(torch.tensor(trainer.train_dataset["ref_chosen_logps"]), ref_c, atol=1e-4, rtol=1e-5)
    beta = args.beta
    if name == "spin":
        losses, real_rewards, _ = spin_loss(policy_c, policy_r, ref_c, ref_r, beta=beta, loss_type="hinge")
        expected = losses.mean() - 0.5 * _recompute_sft_mean(perturbed_model_path, trainer)
        assert logged["rewards/real"] == pytest.approx(real_rewards.mean().item(), rel=1e-4)
    elif name == "iris" and args.loss_type == ["renyi"]:
        expected, real_w, generated_w = iris_loss(policy_c, policy_r, ref_c, ref_r, beta=beta, alpha=2.0)
        assert logged["iris/objective"] == pytest.approx(expected.item(), rel=1e-4)
        assert logged["iris/ess_real"] == pytest.approx(1 / (real_w**2).sum().item(), rel=1e-4)
        assert logged["iris/ess_generated"] == pytest.approx(1 / (generated_w**2).sum().item(), rel=1e-4)
    elif name == "iris":
        expected = space_loss(policy_c, policy_r, ref_c, ref_r, mu=2.0).mean()
    else:
        anchor_c = torch.tensor(dataset["anchor_chosen_logps"])
        anchor_r = torch.tensor(dataset["anchor_rejected_logps"])
        # omd: G = P − τ·log(π_t/μ), written out here directly in terms of the SPPO residuals.
        eta, tau = 1 / beta, 0.002
        p_c, p_r = torch.tensor(WIN_PROBS["chosen_win_prob"]), torch.tensor(WIN_PROBS["rejected_win_prob"])
        g_c, g_r = p_c - tau * (ref_c - anchor_c), p_r - tau * (ref_r - anchor_r)
        sppo = 0.5 * ((policy_c - ref_c - eta * (g_c - 0.5)) ** 2 + (policy_r - ref_r - eta * (g_r - 0.5)) ** 2)
        # With τ = 0 the pure function must agree with the same expression.
        plain = sppo_loss(policy_c, policy_r, ref_c, ref_r, p_c, p_r, beta=beta)
        torch.testing.assert_close(
            plain, 0.5 * ((policy_c - ref_c - eta * (p_c - 0.5)) ** 2 + (policy_r - ref_r - eta * (p_r - 0.5)) ** 2)
        )
        expected = sppo.mean()
        assert logged["rspo/sppo_loss"] == pytest.approx(expected.item(), rel=1e-4)
        for kind, weight in args.regularizers.items():
            value = (
                rspo_regularizer(policy_c, anchor_c, kind).mean() + rspo_regularizer(policy_r, anchor_r, kind).mean()
            )
            assert logged[f"rspo/reg_{kind}"] == pytest.approx(value.item(), rel=1e-4)
            expected = expected + weight * value
    assert logged["loss"] == pytest.approx(expected.item(), rel=1e-4, abs=1e-5)


def _recompute_sft_mean(model_path, trainer):
    """Mean per-token log-prob of the chosen completions (TRL's 'sft' term, pooled over the batch)."""
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    token_logps = []
    with torch.no_grad():
        for example in trainer.train_dataset:
            ids = torch.tensor([example["prompt_ids"] + example["chosen_ids"]])
            logits = model(input_ids=ids).logits[0, :-1]
            logps = torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None]).squeeze(-1)
            token_logps.append(logps[len(example["prompt_ids"]) - 1 :])
    return torch.cat(token_logps).mean()


# ---------------------------------------------------------------------------------------------------------------
# SPIN sigmoid == trl.DPOTrainer
@pytest.mark.parametrize("impl", ["direct", "fused"])
def test_spin_sigmoid_equals_dpo_loss_and_gradients(impl, tiny_model_path, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    dataset = _dataset(with_win_probs=False)
    config = {**COMMON, "per_device_train_batch_size": 4, "precompute_ref_log_probs": True, "beta": 0.3}
    dpo = DPOTrainer(
        tiny_model_path,
        args=DPOConfig(str(tmp_path / "dpo"), bf16=False, **config),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    spin = SPINTrainer(
        tiny_model_path,
        args=SPINConfig(str(tmp_path / "spin"), logprob_impl=impl, **config),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    # Move both policies away from the reference identically so the loss is not at its trivial value log 2.
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p_dpo, p_spin in zip(dpo.model.parameters(), spin.model.parameters(), strict=True):
            noise = 0.02 * torch.randn(p_dpo.shape, generator=generator)
            p_dpo.add_(noise)
            p_spin.add_(noise)
    results = []
    for trainer in (dpo, spin):
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
        trainer.model.train()
        trainer.model.zero_grad()
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters()}))
    (dpo_loss, dpo_grads), (spin_loss_value, spin_grads) = results
    assert abs(dpo_loss.item() - torch.log(torch.tensor(2.0)).item()) > 1e-3
    torch.testing.assert_close(spin_loss_value, dpo_loss, atol=1e-6, rtol=1e-5)
    for name, grad in dpo_grads.items():
        torch.testing.assert_close(spin_grads[name], grad, atol=1e-6, rtol=1e-4, msg=name)


# ---------------------------------------------------------------------------------------------------------------
# RSPO: one resident model; anchor = reference copied once
def test_rspo_holds_one_model_and_copies_anchor_from_reference(tiny_model_path, tmp_path):
    trainer = _make("rspo", tiny_model_path, tmp_path, max_steps=2)
    columns = trainer.train_dataset.column_names
    assert {"ref_chosen_logps", "anchor_chosen_logps", "anchor_rejected_logps"} <= set(columns)
    assert trainer.train_dataset["anchor_chosen_logps"] == trainer.train_dataset["ref_chosen_logps"]
    trainer.train()
    assert trainer.ref_model is None
    modules = {id(v) for v in vars(trainer).values() if isinstance(v, torch.nn.Module)}
    assert modules == {id(trainer.model)}, [k for k, v in vars(trainer).items() if isinstance(v, torch.nn.Module)]
    # At the first step the policy equals μ: every regularizer sits at its minimum value.
    first = trainer.state.log_history[0]
    assert first["rspo/reg_reverse_kl"] == pytest.approx(0.0, abs=1e-6)
    assert first["rspo/reg_forward_kl_is"] == pytest.approx(2.0, abs=1e-5)


def test_sppo_without_regularizers_needs_no_anchor(tiny_model_path, tmp_path):
    """λ = 0 (SPPO): no anchor columns are computed or read."""
    trainer = _make("rspo", tiny_model_path, tmp_path, max_steps=2, regularizers={})
    assert not trainer.args.needs_anchor
    assert not any(name.startswith("anchor_") for name in trainer.train_dataset.column_names)
    trainer.train()
    logs = trainer.state.log_history[0]
    assert logs["loss"] == pytest.approx(logs["rspo/sppo_loss"], rel=1e-6)
    assert not any(key.startswith("rspo/reg_") for key in logs)


def test_rspo_anchor_from_policy_when_reference_is_resident(tiny_model_path, tmp_path):
    """No precomputed reference to copy: μ (the initial policy) is computed once before training."""
    trainer = _make("rspo", tiny_model_path, tmp_path, max_steps=1, precompute_ref_log_probs=False)
    assert trainer.ref_model is not None  # TRL's resident reference, as asked
    chosen, rejected = _recompute_logps(tiny_model_path, trainer)
    torch.testing.assert_close(
        torch.tensor(trainer.train_dataset["anchor_chosen_logps"]), chosen, atol=1e-4, rtol=1e-5
    )
    torch.testing.assert_close(
        torch.tensor(trainer.train_dataset["anchor_rejected_logps"]), rejected, atol=1e-4, rtol=1e-5
    )


def test_supplied_reference_columns_are_used_as_given(tiny_model_path, tmp_path):
    """Reference columns computed by the caller (e.g. the runner): no reference pass, no reference model."""
    ref_chosen, ref_rejected = [-1.0, -2.0, -3.0, -4.0], [-5.0, -6.0, -7.0, -8.0]
    dataset = _dataset(with_win_probs=False)
    dataset = dataset.add_column("ref_chosen_logps", ref_chosen).add_column("ref_rejected_logps", ref_rejected)
    trainer = _make("spin", tiny_model_path, tmp_path, dataset=dataset, max_steps=1, learning_rate=0.0)
    assert trainer.ref_model is None and trainer.train_dataset["ref_chosen_logps"] == ref_chosen
    trainer.train()
    chosen, rejected = _recompute_logps(tiny_model_path, trainer)
    logged = trainer.state.log_history[0]
    beta = trainer.args.beta
    assert logged["rewards/chosen"] == pytest.approx(
        (beta * (chosen - torch.tensor(ref_chosen))).mean().item(), rel=1e-4
    )
    expected, _, _ = spin_loss(chosen, rejected, torch.tensor(ref_chosen), torch.tensor(ref_rejected), beta=beta)
    assert logged["loss"] == pytest.approx(expected.mean().item(), rel=1e-4)


def test_rspo_anchor_from_separate_model_path(tiny_model_path, tmp_path):
    """μ given by path (iterations t >= 1): loaded for the precompute only, then freed."""
    trainer = _make("rspo", tiny_model_path, tmp_path, max_steps=1, anchor_model_name_or_path=tiny_model_path)
    ref = torch.tensor(trainer.train_dataset["ref_chosen_logps"])
    anchor = torch.tensor(trainer.train_dataset["anchor_chosen_logps"])
    torch.testing.assert_close(anchor, ref, atol=1e-4, rtol=1e-5)  # same weights, computed separately
    modules = [k for k, v in vars(trainer).items() if isinstance(v, torch.nn.Module)]
    assert modules == ["model"] or set(modules) == {"model", "model_wrapped"}


# ---------------------------------------------------------------------------------------------------------------
# PEFT (LoRA)
def test_spin_lora_trains_adapters_only_and_uses_base_as_reference(tiny_model_path, tmp_path):
    from peft import LoraConfig

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    # TRL's default gradient checkpointing on, to cover it with the direct log-prob path and PEFT.
    config = {**COMMON, "gradient_checkpointing": True}
    args = SPINConfig(str(tmp_path), per_device_train_batch_size=4, learning_rate=5e-3, max_steps=3, **config)
    trainer = SPINTrainer(
        tiny_model_path,
        args=args,
        train_dataset=_dataset(with_win_probs=False),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    )
    assert trainer.ref_model is None  # reference = the base model with adapters disabled
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    lora_changed = [n for n, p in trainer.model.named_parameters() if "lora_" in n and not torch.equal(p, before[n])]
    base_changed = [
        n for n, p in trainer.model.named_parameters() if "lora_" not in n and not torch.equal(p, before[n])
    ]
    assert lora_changed and not base_changed
    # The reference log-probs after training equal those of the untouched base model.
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    ref_chosen, _ = trainer.compute_ref_log_probs(trainer.model, batch)
    policy = trainer._per_token_logps(trainer.model, batch).log_probs.sum(1).chunk(2)[0]
    fresh_chosen, _ = _recompute_logps(tiny_model_path, trainer)
    torch.testing.assert_close(ref_chosen, fresh_chosen, atol=1e-4, rtol=1e-5)
    assert (policy.detach() - ref_chosen).abs().max() > 1e-3  # the adapters moved the policy


# ---------------------------------------------------------------------------------------------------------------
# RSPO forward KL: NLL of responses sampled from μ (`anchor_completion`)
ANCHOR_SAMPLES = [" Paris is the capital.", " It has eight legs.", " hi there", " Waves and wind."]


def _anchor_sample_dataset(conversational: bool = False) -> Dataset:
    data = _dataset(conversational=conversational)
    if conversational:
        return data.add_column(
            "anchor_completion", [[{"role": "assistant", "content": a.strip()}] for a in ANCHOR_SAMPLES]
        )
    return data.add_column("anchor_completion", ANCHOR_SAMPLES)


def _sample_logps(model, tokenizer, prompts, completions, grad: bool = False):
    """Summed log-probs of plain-text completions (EOS appended, as TRL does) after their prompts, full logits."""
    values = []
    for prompt, completion in zip(prompts, completions):
        prompt_ids = tokenizer(prompt)["input_ids"]
        ids = torch.tensor([tokenizer(prompt + completion + tokenizer.eos_token)["input_ids"]])
        assert ids[0, : len(prompt_ids)].tolist() == prompt_ids
        with torch.set_grad_enabled(grad):
            logits = model(input_ids=ids).logits[0, :-1]
            token_logps = torch.log_softmax(logits.float(), -1).gather(-1, ids[0, 1:, None]).squeeze(-1)
            values.append(token_logps[len(prompt_ids) - 1 :].sum())
    return torch.stack(values)


def test_rspo_forward_kl_needs_anchor_samples_before_model_loading(tmp_path):
    args = RSPOConfig(str(tmp_path), regularizers={"forward_kl": 1.0}, **COMMON)
    assert args.needs_anchor_samples and not args.needs_anchor_logps
    with pytest.raises(ValueError, match="lacks the column `anchor_completion`.*forward_kl_is"):
        RSPOTrainer(str(tmp_path / "does-not-exist"), args=args, train_dataset=_dataset())


@pytest.mark.parametrize("impl", ["direct", "fused"])
def test_rspo_forward_kl_loss_and_gradient_match_independent_computation(
    impl, tiny_model_path, perturbed_model_path, tmp_path
):
    """μ = the tiny model (by path), policy = a perturbed copy. The precomputed log μ(sample), the logged
    regularizer and loss, and the gradient the regularizer adds (that of the NLL of μ's samples) all equal a plain
    full-logits computation."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    weight = 1.0
    args = RSPOConfig(
        str(tmp_path),
        **{**COMMON, "per_device_train_batch_size": 4, "precompute_ref_log_probs": True, "logging_steps": 1},
        beta=0.01,
        regularizers={"forward_kl": weight},
        anchor_model_name_or_path=tiny_model_path,
        logprob_impl=impl,
        learning_rate=0.0,
        max_steps=1,
        # The gradient check below differences two losses (λ = 1 and 0): the pairs must be forwarded in the same
        # layout both times, which prefix sharing would change (the μ sample joins the pair's packed row).
        prefix_sharing="off",
    )
    trainer = RSPOTrainer(
        perturbed_model_path, args=args, train_dataset=_anchor_sample_dataset(), processing_class=tokenizer
    )
    assert not {"anchor_chosen_logps", "anchor_rejected_logps"} & set(trainer.train_dataset.column_names)
    mu = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32).eval()
    policy = AutoModelForCausalLM.from_pretrained(perturbed_model_path, dtype=torch.float32).eval()
    anchor_logps = _sample_logps(mu, tokenizer, PROMPTS, ANCHOR_SAMPLES)
    torch.testing.assert_close(
        torch.tensor(trainer.train_dataset["anchor_completion_logps"]), anchor_logps, atol=1e-4, rtol=1e-5
    )
    policy_logps = _sample_logps(policy, tokenizer, PROMPTS, ANCHOR_SAMPLES)
    expected_reg = (anchor_logps - policy_logps).mean()
    assert abs(expected_reg.item()) > 1e-2  # the policy is away from μ: a non-trivial value

    trainer.train()
    logged = trainer.state.log_history[0]
    assert logged["rspo/reg_forward_kl"] == pytest.approx(expected_reg.item(), rel=1e-4)
    assert logged["loss"] == pytest.approx(logged["rspo/sppo_loss"] + weight * expected_reg.item(), rel=1e-4)

    # Gradient: (loss with λ = 1) − (loss with λ = 0) has the gradient of the mean NLL of μ's samples.
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    grads = []
    for regularizers in ({"forward_kl": weight}, {"forward_kl": 0.0}):
        trainer.args.regularizers = regularizers
        trainer.model.zero_grad()
        trainer.compute_loss(trainer.model, batch).backward()
        grads.append({n: p.grad.clone() for n, p in trainer.model.named_parameters()})
    policy.zero_grad()
    nll = -_sample_logps(policy, tokenizer, PROMPTS, ANCHOR_SAMPLES, grad=True).mean()
    nll.backward()
    for name, param in policy.named_parameters():
        torch.testing.assert_close(
            grads[0][name] - grads[1][name], weight * param.grad, atol=1e-5, rtol=1e-3, msg=name
        )

    # `forward_kl_reduction="padded_token_mean"` (the original RSPO code's): the same term over batch size × longest
    # μ sample of the batch instead of the batch size.
    trainer.args.regularizers = {"forward_kl": weight}
    longest = int(batch["anchor_completion_mask"].sum(dim=1).max())
    assert longest > 1
    losses = {}
    for reduction in ("sum", "padded_token_mean"):
        trainer.args.forward_kl_reduction = reduction
        with torch.no_grad():
            losses[reduction] = trainer.compute_loss(trainer.model, batch).item()
    assert losses["sum"] - losses["padded_token_mean"] == pytest.approx(
        weight * expected_reg.item() * (1 - 1 / longest), rel=1e-3
    )


def test_rspo_forward_kl_conversational_anchor_from_initial_policy(tiny_model_path, tmp_path):
    """μ = π_0 (no anchor path): μ's log-probs of its samples come from the initial policy, so the forward-KL
    estimate is 0 at step 1; conversational μ samples are tokenised with the chat template, like `chosen`."""
    data = _anchor_sample_dataset(conversational=True)
    trainer = _make(
        "rspo", tiny_model_path, tmp_path, dataset=data, max_steps=3,
        regularizers={"forward_kl": 1.0, "reverse_kl": 0.5},
    )  # fmt: skip
    tokenizer = trainer.processing_class
    for example, raw in zip(trainer.train_dataset, data):
        full = tokenizer.apply_chat_template(raw["prompt"] + raw["anchor_completion"], tokenize=True)
        full = list(full["input_ids"] if hasattr(full, "keys") else full)
        assert example["prompt_ids"][: example["anchor_prompt_length"]] + example["anchor_completion_ids"] == full
        assert example["anchor_prompt_length"] == len(example["prompt_ids"])
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logs[0]["rspo/reg_forward_kl"] == pytest.approx(0.0, abs=1e-4)
    assert logs[0]["rspo/reg_reverse_kl"] == pytest.approx(0.0, abs=1e-6)
    assert logs[-1]["rspo/reg_forward_kl"] != pytest.approx(0.0, abs=1e-4)  # training moved the policy off μ
    assert all(torch.isfinite(torch.tensor([entry["loss"] for entry in logs])))


def test_rspo_collator_pads_and_truncates_anchor_samples():
    from trl_selfplay.trainers.rspo import DataCollatorForRSPO

    examples = [
        {"prompt_ids": [1, 2, 3], "chosen_ids": [4], "rejected_ids": [5], "anchor_completion_ids": [6, 7, 8],
         "anchor_prompt_length": 3, "anchor_completion_logps": -1.5},
        {"prompt_ids": [9, 10], "chosen_ids": [11], "rejected_ids": [12], "anchor_completion_ids": [13],
         "anchor_prompt_length": 1, "anchor_completion_logps": -2.5},
    ]  # fmt: skip
    batch = DataCollatorForRSPO(pad_token_id=0)(examples)
    assert batch["anchor_input_ids"].tolist() == [[1, 2, 3, 6, 7, 8], [9, 13, 0, 0, 0, 0]]
    assert batch["anchor_completion_mask"].tolist() == [[0, 0, 0, 1, 1, 1], [0, 1, 0, 0, 0, 0]]
    assert batch["anchor_attention_mask"].tolist() == [[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]]
    assert batch["anchor_completion_logps"].tolist() == [-1.5, -2.5]
    kept_end = DataCollatorForRSPO(pad_token_id=0, max_length=4, truncation_mode="keep_end")(examples)
    assert kept_end["anchor_input_ids"].tolist() == [[3, 6, 7, 8], [9, 13, 0, 0]]
    assert kept_end["anchor_completion_mask"].tolist() == [[0, 1, 1, 1], [0, 1, 0, 0]]
