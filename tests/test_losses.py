"""The losses of `trl_selfplay.losses` against independent numpy computations, hand-worked numbers and the
properties `docs/methods.md` states."""

import math

import numpy as np
import pytest
import torch

from trl_selfplay.losses import (
    distribution_gap,
    forward_kl_regularizer,
    iris_alpha,
    iris_loss,
    rspo_regularizer,
    space_loss,
    spin_loss,
    sppo_loss,
    win_probabilities,
)


def _logps(seed: int, n: int = 6, scale: float = 3.0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [(-20 + scale * torch.randn(n, generator=g, dtype=torch.float64)) for _ in range(4)]


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy().astype(np.float64)


def _np_logsigmoid(x: np.ndarray) -> np.ndarray:
    return -np.logaddexp(0.0, -x)


# ---------------------------------------------------------------- SPIN


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge"])
def test_spin_loss_matches_numpy(loss_type):
    pr, pg, rr, rg = _logps(0)
    losses, real_rewards, generated_rewards = spin_loss(pr, pg, rr, rg, beta=0.3, loss_type=loss_type)
    t = 0.3 * ((_np(pr) - _np(rr)) - (_np(pg) - _np(rg)))
    expected = -_np_logsigmoid(t) if loss_type == "sigmoid" else np.maximum(0.0, 1.0 - t)
    np.testing.assert_allclose(_np(losses), expected, rtol=1e-12)
    np.testing.assert_allclose(_np(real_rewards), 0.3 * (_np(pr) - _np(rr)), rtol=1e-12)
    np.testing.assert_allclose(_np(generated_rewards), 0.3 * (_np(pg) - _np(rg)), rtol=1e-12)
    assert not real_rewards.requires_grad


def test_spin_loss_hand_worked():
    # h_r = 1, h_g = -1, beta = 0.5: t = 1, -log sigmoid(1) = log(1 + e^-1); hinge max(0, 1 - 1) = 0
    args = [torch.tensor([1.0]), torch.tensor([-1.0]), torch.tensor([0.0]), torch.tensor([0.0])]
    assert spin_loss(*args, beta=0.5)[0].item() == pytest.approx(math.log1p(math.exp(-1)))
    assert spin_loss(*args, beta=0.5, loss_type="hinge")[0].item() == 0.0


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge"])
def test_spin_loss_gradcheck(loss_type):
    tensors = [t.clone().requires_grad_(True) for t in _logps(1, scale=0.5)]
    # hinge is not differentiable at its kink; the random inputs sit away from it
    assert torch.autograd.gradcheck(lambda *x: spin_loss(*x, beta=0.7, loss_type=loss_type)[0], tensors)


def test_spin_loss_equals_trl_dpo_sigmoid_loss(tiny_model_path):
    """TRL's DPOTrainer, on a real batch with precomputed reference log-probs, against spin_loss on the same four
    tensors (policy log-probs recomputed independently from the model)."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    data = Dataset.from_dict(
        {
            "prompt": ["What is the capital of France?", "Write a poem about the sea."],
            "chosen": [" The capital of France is Paris.", " The sea is wide and blue."],
            "rejected": [" A cat.", " The waves come in and go out again and again."],
        }
    )
    args = DPOConfig(
        output_dir="/tmp/unused",
        beta=0.2,
        bf16=False,
        gradient_checkpointing=False,
        precompute_ref_log_probs=True,
        per_device_train_batch_size=2,
        report_to="none",
    )
    trainer = DPOTrainer(model=tiny_model_path, args=args, train_dataset=data)
    batch = next(iter(trainer.get_train_dataloader()))
    # Perturb the reference so that the log-ratios are far from zero
    batch["ref_chosen_logps"] = batch["ref_chosen_logps"] + torch.tensor([1.5, -2.0])
    batch["ref_rejected_logps"] = batch["ref_rejected_logps"] + torch.tensor([-0.5, 3.0])
    with torch.no_grad():
        trl_loss = trainer.compute_loss(trainer.model, batch)
        logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        token_logps = torch.log_softmax(logits[:, :-1].double(), -1).gather(-1, batch["input_ids"][:, 1:, None])
        logps = (token_logps.squeeze(-1) * batch["completion_mask"][:, 1:]).sum(-1)
    chosen, rejected = logps.chunk(2)
    losses, _, _ = spin_loss(
        chosen, rejected, batch["ref_chosen_logps"].double(), batch["ref_rejected_logps"].double(), beta=0.2
    )
    assert trl_loss.item() == pytest.approx(losses.mean().item(), rel=1e-4)


# ---------------------------------------------------------------- IRIS


def _np_iris(pr, pg, rr, rg, beta, alpha):
    x = -beta * (_np(pr) - _np(rr))
    y = beta * (_np(pg) - _np(rg))

    def tilted(v, t):
        m = (t * v).max()
        return (m + np.log(np.mean(np.exp(t * v - m)))) / t

    return tilted(x, 1 - alpha) + tilted(y, alpha)


@pytest.mark.parametrize("alpha", [0.3, 0.5, 0.9, 1.5, 2.0, 5.0])
def test_iris_loss_matches_numpy(alpha):
    pr, pg, rr, rg = _logps(2, n=7)
    loss, w, v = iris_loss(pr, pg, rr, rg, beta=0.4, alpha=alpha)
    assert loss.item() == pytest.approx(_np_iris(pr, pg, rr, rg, 0.4, alpha), rel=1e-10)
    hr, hg = 0.4 * (_np(pr) - _np(rr)), 0.4 * (_np(pg) - _np(rg))
    ew = np.exp((alpha - 1) * hr - ((alpha - 1) * hr).max())
    ev = np.exp(alpha * hg - (alpha * hg).max())
    np.testing.assert_allclose(_np(w), ew / ew.sum(), rtol=1e-10)
    np.testing.assert_allclose(_np(v), ev / ev.sum(), rtol=1e-10)
    assert w.sum().item() == pytest.approx(1.0) and v.sum().item() == pytest.approx(1.0)


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
def test_iris_gradient_is_weighted_log_ratio_gradient(alpha):
    """dL/dh_r = -beta w, dL/dh_g = +beta v (docs/methods.md, "The Rényi objective"), and gradcheck in float64."""
    pr, pg, rr, rg = (t.clone().requires_grad_(True) for t in _logps(3, n=5, scale=1.0))
    loss, w, v = iris_loss(pr, pg, rr, rg, beta=0.5, alpha=alpha)
    loss.backward()
    torch.testing.assert_close(pr.grad, -0.5 * w)
    torch.testing.assert_close(pg.grad, 0.5 * v)
    torch.testing.assert_close(rr.grad, 0.5 * w)
    inputs = [t.detach().clone().requires_grad_(True) for t in (pr, pg, rr, rg)]
    assert torch.autograd.gradcheck(lambda *x: iris_loss(*x, beta=0.5, alpha=alpha)[0], inputs)


def test_iris_alpha_one_is_donsker_varadhan_and_continuous():
    pr, pg, rr, rg = _logps(4, n=8, scale=1.0)
    beta = 0.3
    hr, hg = beta * (pr - rr), beta * (pg - rg)
    dv = -hr.mean() + torch.log(torch.exp(hg).mean())
    at_one = iris_loss(pr, pg, rr, rg, beta=beta, alpha=1.0)[0]
    assert at_one.item() == pytest.approx(dv.item(), rel=1e-12)
    for delta in (1e-6, -1e-6):
        assert iris_loss(pr, pg, rr, rg, beta=beta, alpha=1.0 + delta)[0].item() == pytest.approx(at_one.item())
    # The closed form just outside the threshold converges linearly to the limit (first-order term δ·Var/2)
    for delta in (2e-4, -2e-4, 1e-3):
        value = iris_loss(pr, pg, rr, rg, beta=beta, alpha=1.0 + delta)[0].item()
        assert abs(value - at_one.item()) < 2 * abs(delta) * (1 + hr.var().item() + hg.var().item())
        assert abs(value - at_one.item()) > 0  # the closed form is really used there


def test_iris_small_alpha_second_term_is_mean():
    pr, pg, rr, rg = _logps(5, n=6, scale=1.0)
    loss = iris_loss(pr, pg, rr, rg, beta=0.2, alpha=1e-6)[0]
    # alpha -> 0: the second term is its limit mean(beta h_g); the first keeps its tilt 1 - alpha
    tilt = 1 - 1e-6
    x = -0.2 * (pr - rr)
    expected = (torch.logsumexp(tilt * x, 0) - math.log(6)) / tilt + (0.2 * (pg - rg)).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-9)


def test_iris_alpha_half_equal_tilts_and_alpha_two_chi_square():
    # alpha = 1/2: both terms use the tilt 1/2, so the loss is symmetric under (h_r, h_g) -> (-h_g, -h_r)
    pr, pg, rr, rg = _logps(6, n=5, scale=1.0)
    zeros = torch.zeros(5, dtype=torch.float64)
    a = iris_loss(pr, pg, rr, rg, alpha=0.5)[0]
    b = iris_loss(-(pg - rg), -(pr - rr), zeros, zeros, alpha=0.5)[0]
    assert a.item() == pytest.approx(b.item(), rel=1e-10)
    assert not math.isclose(a.item(), iris_loss(-(pg - rg), -(pr - rr), zeros, zeros, alpha=2.0)[0].item())
    # alpha = 2 at the optimal discriminator g* = log dP/dQ: -L = R_2(P||Q) = 1/2 log(1 + chi^2). P and Q are two
    # point masses, represented by 10 samples each with frequencies 7/3 (annotated) and 4/6 (generated).
    p, q = np.array([0.7, 0.3]), np.array([0.4, 0.6])
    g = np.log(p / q)
    hr = torch.tensor([g[0]] * 7 + [g[1]] * 3, dtype=torch.float64)
    hg = torch.tensor([g[0]] * 4 + [g[1]] * 6, dtype=torch.float64)
    zeros = torch.zeros(10, dtype=torch.float64)
    loss = iris_loss(hr, hg, zeros, zeros, beta=1.0, alpha=2.0)[0]
    chi2 = np.sum((p - q) ** 2 / q)
    assert -loss.item() == pytest.approx(0.5 * np.log(1 + chi2), rel=1e-10)
    # and any other discriminator gives a smaller bound
    assert -iris_loss(0.5 * hr, 0.5 * hg, zeros, zeros, beta=1.0, alpha=2.0)[0].item() < -loss.item()


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
def test_iris_fixed_point_uniform_weights_and_zero_expected_gradient(alpha):
    """At theta = theta_t (h == 0) the weights are uniform; when annotated and generated sequences come from the
    same distribution, the expected gradient vanishes. Per-sequence log-ratio gradients are random features f:
    h = theta . f with theta = 0, so dL/dtheta = beta (-mean f_r + mean f_g). Over 4000 batches of 16, the mean
    gradient must be within 5 standard errors of 0, while the same test with shifted generated features is not."""
    g = torch.Generator().manual_seed(0)
    beta, dim, batches, n = 0.1, 3, 4000, 16

    def mean_grad(shift: float) -> torch.Tensor:
        grads = []
        for _ in range(batches):
            theta = torch.zeros(dim, dtype=torch.float64, requires_grad=True)
            f_r = 1.0 + torch.randn(n, dim, generator=g, dtype=torch.float64)
            f_g = 1.0 + shift + torch.randn(n, dim, generator=g, dtype=torch.float64)
            ref = torch.full((n,), -30.0, dtype=torch.float64)
            loss, w, v = iris_loss(ref + f_r @ theta, ref + f_g @ theta, ref, ref, beta=beta, alpha=alpha)
            torch.testing.assert_close(w, torch.full_like(w, 1 / n))
            torch.testing.assert_close(v, torch.full_like(v, 1 / n))
            (grad,) = torch.autograd.grad(loss, theta)
            grads.append(grad)
        return torch.stack(grads)

    same = mean_grad(0.0)
    stderr = same.std(0) / math.sqrt(batches)
    assert (same.mean(0).abs() < 5 * stderr).all()
    shifted = mean_grad(0.2)
    assert (shifted.mean(0).abs() > 5 * stderr).all()


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0, 1e-5])
def test_iris_loss_stable_at_extreme_log_ratios(alpha):
    beta = 0.1
    pr = torch.tensor([1e5, -1e5, 0.0], requires_grad=True)
    pg = torch.tensor([-1e5, 1e5, 3.0], requires_grad=True)
    zeros = torch.zeros(3)
    loss, w, v = iris_loss(pr, pg, zeros, zeros, beta=beta, alpha=alpha)  # |beta h| = 1e4
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(pr.grad).all() and torch.isfinite(pg.grad).all()
    assert torch.isfinite(w).all() and torch.isfinite(v).all()


@pytest.mark.parametrize("alpha", [0.0, -1.0, float("nan"), float("inf")])
def test_iris_rejects_invalid_alpha(alpha):
    t = torch.zeros(2)
    with pytest.raises(ValueError, match="alpha"):
        iris_loss(t, t, t, t, alpha=alpha)


# ---------------------------------------------------------------- SPACE


@pytest.mark.parametrize("mu", [1.0, 0.25, 4.0])
def test_space_loss_matches_definition(mu):
    pr, pg, rr, rg = _logps(7, scale=0.5)
    losses = space_loss(pr, pg, rr, rg, mu=mu)
    hr, hg = _np(pr) - _np(rr), _np(pg) - _np(rg)

    def sigma_mu(x):
        return 1.0 / (1.0 + mu * np.exp(-x))

    expected = -np.log(sigma_mu(hr)) - mu * np.log(1 - sigma_mu(hg))
    np.testing.assert_allclose(_np(losses), expected, rtol=1e-10)
    tensors = [t.clone().requires_grad_(True) for t in (pr, pg, rr, rg)]
    assert torch.autograd.gradcheck(lambda *x: space_loss(*x, mu=mu), tensors)


def test_space_loss_is_not_shift_invariant_but_spin_is():
    pr, pg, rr, rg = _logps(8, scale=0.5)
    shift = 2.0
    spin_a = spin_loss(pr, pg, rr, rg)[0]
    spin_b = spin_loss(pr + shift, pg + shift, rr, rg)[0]
    torch.testing.assert_close(spin_a, spin_b)
    assert not torch.allclose(space_loss(pr, pg, rr, rg), space_loss(pr + shift, pg + shift, rr, rg))


# ---------------------------------------------------------------- SPPO / RSPO


def test_sppo_loss_hand_worked():
    # beta = 0.5 -> eta = 2. chosen: h = 1 - 0 = 1, p = 0.75 -> target 0.5, error 0.5
    # rejected: h = -2 - (-1) = -1, p = 0.25 -> target -0.5, error -0.5. loss = 0.5 (0.25 + 0.25) = 0.25
    loss = sppo_loss(
        torch.tensor([1.0]),
        torch.tensor([-2.0]),
        torch.tensor([0.0]),
        torch.tensor([-1.0]),
        torch.tensor([0.75]),
        torch.tensor([0.25]),
        beta=0.5,
    )
    assert loss.item() == pytest.approx(0.25)


def test_sppo_loss_matches_numpy_and_gradcheck():
    pc, pl, rc, rl = _logps(9)
    g = torch.Generator().manual_seed(0)
    wc, wl = torch.rand(6, generator=g, dtype=torch.float64), torch.rand(6, generator=g, dtype=torch.float64)
    losses = sppo_loss(pc, pl, rc, rl, wc, wl, beta=0.01)
    eta = 100.0
    expected = 0.5 * (
        (_np(pc) - _np(rc) - eta * (_np(wc) - 0.5)) ** 2 + (_np(pl) - _np(rl) - eta * (_np(wl) - 0.5)) ** 2
    )
    np.testing.assert_allclose(_np(losses), expected, rtol=1e-12)
    tensors = [t.clone().requires_grad_(True) for t in (pc, pl, rc, rl)]
    assert torch.autograd.gradcheck(lambda *x: sppo_loss(*x, wc, wl, beta=0.01), tensors)


def test_sppo_rejects_probabilities_out_of_range():
    t = torch.zeros(2)
    with pytest.raises(ValueError, match="chosen_win_prob"):
        sppo_loss(t, t, t, t, torch.tensor([0.5, 1.2]), torch.tensor([0.5, 0.5]))


def test_rspo_regularizers_hand_worked():
    policy = torch.tensor([-3.0, -1.0, -60.0, 0.0])
    anchor = torch.tensor([-1.0, -3.0, -10.0, -50.0])
    d = policy - anchor  # [-2, 2, -50, 50]
    torch.testing.assert_close(rspo_regularizer(policy, anchor, "reverse_kl"), d**2)
    fwd = rspo_regularizer(policy, anchor, "forward_kl_is", log_ratio_clip=10.0)
    torch.testing.assert_close(fwd, torch.tensor([math.exp(2), math.exp(-2), math.exp(10), math.exp(-50)]))
    chi2 = rspo_regularizer(policy, anchor, "chi2", log_ratio_clip=10.0)
    torch.testing.assert_close(chi2, torch.tensor([math.exp(-2), math.exp(2), math.exp(-50), math.exp(10)]))
    # forward_kl: log mu - log pi (no clip: it is linear in d)
    torch.testing.assert_close(rspo_regularizer(policy, anchor, "forward_kl"), torch.tensor([2.0, -2.0, 50.0, -50.0]))


def test_forward_kl_on_anchor_samples_estimates_kl_and_has_the_nll_gradient():
    """On responses drawn from mu, the mean of `forward_kl` is a Monte-Carlo estimate of KL(mu || pi) (checked
    against the exact numpy value of two categorical distributions), and its gradient is the NLL gradient of the
    samples: for pi = softmax(theta), d/dtheta mean(-log pi(y)) = softmax(theta) - empirical frequencies."""
    rng = np.random.default_rng(0)
    vocab, n = 6, 20000
    mu = rng.dirichlet(np.ones(vocab))
    theta = torch.tensor(rng.normal(size=vocab), dtype=torch.float64, requires_grad=True)
    samples = torch.as_tensor(rng.choice(vocab, size=n, p=mu))
    log_pi = torch.log_softmax(theta, dim=0)
    log_mu = torch.log(torch.as_tensor(mu))
    values = rspo_regularizer(log_pi[samples], log_mu[samples], "forward_kl")
    pi = np.exp(log_pi.detach().numpy())
    exact_kl = float(np.sum(mu * (np.log(mu) - np.log(pi))))
    standard_error = values.detach().std().item() / math.sqrt(n)
    assert abs(values.mean().item() - exact_kl) < 5 * standard_error
    assert exact_kl > 20 * standard_error  # the estimate is not trivially near 0
    values.mean().backward()
    frequencies = np.bincount(samples.numpy(), minlength=vocab) / n
    np.testing.assert_allclose(theta.grad.numpy(), pi - frequencies, atol=1e-12)


def test_rspo_clip_is_in_log_space_and_gradient_stops_at_clip():
    policy = torch.tensor([-50.0, -1.0], requires_grad=True)
    anchor = torch.zeros(2)
    values = rspo_regularizer(policy, anchor, "forward_kl_is", log_ratio_clip=10.0)
    assert values[0].item() == pytest.approx(math.exp(10))  # d = -50 with clip 10 is e^10, not e^50
    values.sum().backward()
    assert policy.grad[0].item() == 0.0  # clipped: no gradient
    assert policy.grad[1].item() == pytest.approx(-math.exp(1.0))


def test_rspo_regularizer_gradcheck():
    policy, anchor = _logps(10, scale=0.5)[:2]
    for kind in ("reverse_kl", "forward_kl_is", "chi2", "forward_kl"):
        x = policy.clone().requires_grad_(True)
        assert torch.autograd.gradcheck(lambda p, k=kind: rspo_regularizer(p, anchor, k, 50.0), (x,))


def test_unknown_kinds_and_shapes_raise():
    t = torch.zeros(3)
    with pytest.raises(ValueError, match="kind"):
        rspo_regularizer(t, t, "kl")
    with pytest.raises(ValueError, match="loss_type"):
        spin_loss(t, t, t, t, loss_type="ipo")
    with pytest.raises(ValueError, match="shape"):
        spin_loss(t, torch.zeros(2), t, t)
    with pytest.raises(ValueError, match="shape"):
        space_loss(torch.zeros(2, 2), torch.zeros(2, 2), torch.zeros(2, 2), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="beta"):
        spin_loss(t, t, t, t, beta=0.0)
    with pytest.raises(ValueError, match="mu"):
        space_loss(t, t, t, t, mu=-1.0)


# ---------------------------------------------------------------- preferences and the alpha schedule


def test_win_probabilities_hand_made_matrix():
    p = torch.tensor([[0.5, 0.8, 0.9], [0.2, 0.5, 0.6], [0.1, 0.4, 0.5]])
    torch.testing.assert_close(win_probabilities(p), torch.tensor([2.2 / 3, 1.3 / 3, 1.0 / 3]))
    torch.testing.assert_close(win_probabilities(p, exclude_self=True), torch.tensor([0.85, 0.4, 0.25]))
    batched = win_probabilities(torch.stack([p, p.T.contiguous()]))
    assert batched.shape == (2, 3)
    torch.testing.assert_close(batched[1], torch.tensor([0.8, 1.7, 2.0]) / 3)


def test_win_probabilities_rejects_bad_input():
    with pytest.raises(ValueError, match="K, K"):
        win_probabilities(torch.full((2, 3), 0.5))
    with pytest.raises(ValueError, match="preferences"):
        win_probabilities(torch.tensor([[0.5, 1.5], [-0.5, 0.5]]))


def test_distribution_gap_hand_worked():
    gap = distribution_gap(
        ref_real_logps=torch.tensor([-20.0, -30.0]),
        ref_generated_logps=torch.tensor([-5.0, -9.0]),
        real_lengths=torch.tensor([10, 10]),
        generated_lengths=torch.tensor([5, 3]),
    )
    # generated per-token: -1, -3 -> -2; real per-token: -2, -3 -> -2.5; gap = 0.5
    assert gap == pytest.approx(0.5)


def test_iris_alpha_schedules():
    assert iris_alpha("constant", 3, 5, alpha=0.7) == 0.7
    assert [iris_alpha("linear", t, 5) for t in range(5)] == pytest.approx([2.0, 1.625, 1.25, 0.875, 0.5])
    assert iris_alpha("adaptive", 0, 5, gap=0.8, initial_gap=0.8) == 2.0
    assert iris_alpha("adaptive", 2, 5, gap=0.4, initial_gap=0.8) == pytest.approx(1.25)
    # Magnitudes: a gap that overshot past 0 counts by its size; one beyond |D_0| is clipped at 1.
    assert iris_alpha("adaptive", 3, 5, gap=-0.1, initial_gap=0.8) == pytest.approx(0.5 + 1.5 * 0.125)
    assert iris_alpha("adaptive", 3, 5, gap=1.6, initial_gap=0.8) == 2.0
    assert iris_alpha("adaptive", 3, 5, gap=0.0, initial_gap=0.8) == 0.5
    assert iris_alpha("adaptive", 2, 5, gap=-0.2, initial_gap=-0.8) == pytest.approx(0.875)  # negative D_0 moves α
    # D_0 = 0: no scale to measure progress against; α stays at alpha_start.
    assert iris_alpha("adaptive", 0, 5, gap=0.0, initial_gap=0.0) == 2.0
    assert iris_alpha("adaptive", 2, 5, gap=-0.3, initial_gap=0.0) == 2.0
    with pytest.raises(ValueError, match="finite"):
        iris_alpha("adaptive", 1, 5, gap=float("nan"), initial_gap=0.8)
    with pytest.raises(ValueError, match="gap"):
        iris_alpha("adaptive", 1, 5)
    with pytest.raises(ValueError, match="alpha_schedule"):
        iris_alpha("cosine", 1, 5)
    with pytest.raises(ValueError, match="alpha"):
        iris_alpha("constant", 0, 1, alpha=0.0)


def test_distribution_gap_current_rows_and_errors():
    args = (torch.tensor([-20.0, -8.0]), torch.tensor([-5.0, -1.0]), torch.tensor([10, 4]), torch.tensor([5, 1]))
    # row 0: generated -1, annotated -2 -> 1.0; row 1: generated -1, annotated -2 -> 1.0; mean over both = 1.0
    assert distribution_gap(*args) == pytest.approx(1.0)
    assert distribution_gap(*args, current=torch.tensor([False, True])) == pytest.approx(1.0)
    skewed = (torch.tensor([-20.0, -4.0]), *args[1:])  # row 1 annotated -1/token: gap 0.0 there
    assert distribution_gap(*skewed, current=torch.tensor([True, False])) == pytest.approx(1.0)
    assert distribution_gap(*skewed, current=torch.tensor([1])) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="selects none"):
        distribution_gap(*args, current=torch.tensor([False, False]))
    with pytest.raises(ValueError, match="one entry per row"):
        distribution_gap(*args, current=torch.tensor([True]))
    with pytest.raises(ValueError, match="max_prompt_length"):
        distribution_gap(args[0], args[1], torch.tensor([10, 0]), args[3])


def test_forward_kl_regularizer_hand_worked():
    policy = torch.tensor([-12.0, -3.0, -6.0])
    anchor = torch.tensor([-10.0, -4.0, -5.0])
    lengths = torch.tensor([6, 2, 4])
    # d = anchor - policy = [2, -1, 1]; sum: mean = 2/3; padded token mean: (2 - 1 + 1) / (3 * 6) = 1/9
    assert forward_kl_regularizer(policy, anchor, lengths).item() == pytest.approx(2 / 3)
    assert forward_kl_regularizer(policy, anchor, lengths, "padded_token_mean").item() == pytest.approx(1 / 9)
    # Without the (θ-constant) anchor term: the original's value, -mean(policy) / L = 21 / 18.
    assert forward_kl_regularizer(policy, None, lengths, "padded_token_mean").item() == pytest.approx(21 / 18)
    with pytest.raises(ValueError, match="reduction"):
        forward_kl_regularizer(policy, anchor, lengths, "token_mean")
    with pytest.raises(ValueError, match="1-D tensors of one shape"):
        forward_kl_regularizer(policy, anchor[:2], lengths)
