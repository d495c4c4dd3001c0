"""Self-play objectives as pure functions of per-sequence log-probabilities.

Every tensor argument is 1-D over the batch and holds *summed* log-probabilities of a completion given its prompt:
`policy_*` under the model being trained πθ, `ref_*` under the frozen opponent π_t of the current iteration,
`anchor_*` under the initial model μ. The log-ratios are `h = policy − ref`. No function here keeps state or
touches a model; the trainers map a batch to these tensors and call them. Formulas: `docs/methods.md`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

SPIN_LOSS_TYPES = ("sigmoid", "hinge")
RSPO_REGULARIZERS = ("reverse_kl", "forward_kl_is", "chi2", "forward_kl")
FORWARD_KL_REDUCTIONS = ("sum", "padded_token_mean")
ALPHA_SCHEDULES = ("constant", "linear", "adaptive")
# Below this distance to a singular order, the exact limit is used (the closed form divides by ~0).
_ORDER_EPS = 1e-4


def _check_same_shape(**tensors: torch.Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    first = next(iter(shapes.values()))
    if len(first) != 1 or any(s != first for s in shapes.values()):
        raise ValueError(f"Expected 1-D tensors of one shape (one value per sequence), got shapes {shapes}.")


def _check_positive(name: str, value: float) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
        raise ValueError(f"`{name}` must be a finite number > 0, got {value!r}.")


def spin_loss(
    policy_real_logps: torch.Tensor,
    policy_generated_logps: torch.Tensor,
    ref_real_logps: torch.Tensor,
    ref_generated_logps: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""SPIN loss (Chen et al., ICML 2024, "Self-Play Fine-Tuning Converts Weak Language Models to Strong Language
    Models", Eq. 4.7).

    With :math:`h_r = \log\pi_\theta(y|x) - \log\pi_t(y|x)` on the annotated response and :math:`h_g` the same on the
    opponent's generation :math:`y'`:

    .. math:: \ell_i = \ell\big(\beta (h_{r,i} - h_{g,i})\big), \quad
              \ell(t) = -\log\sigma(t) \text{ (sigmoid)} \quad\text{or}\quad \max(0, 1 - t) \text{ (hinge)}.

    The sigmoid form equals TRL's DPO sigmoid loss with chosen = annotated, rejected = generated.

    Returns:
        `(losses, real_rewards, generated_rewards)`: the per-pair losses, and the detached implicit rewards
        :math:`\beta h_r`, :math:`\beta h_g`.
    """
    _check_same_shape(
        policy_real_logps=policy_real_logps,
        policy_generated_logps=policy_generated_logps,
        ref_real_logps=ref_real_logps,
        ref_generated_logps=ref_generated_logps,
    )
    _check_positive("beta", beta)
    real_logratios = policy_real_logps - ref_real_logps
    generated_logratios = policy_generated_logps - ref_generated_logps
    logits = beta * (real_logratios - generated_logratios)
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(logits)
    elif loss_type == "hinge":
        losses = torch.relu(1 - logits)
    else:
        raise ValueError(f"`loss_type` must be one of {SPIN_LOSS_TYPES}, got {loss_type!r}.")
    return losses, beta * real_logratios.detach(), beta * generated_logratios.detach()


def _tilted_mean(values: torch.Tensor, tilt: float) -> torch.Tensor:
    r""":math:`\frac{1}{t}\log\frac{1}{n}\sum_i e^{t v_i}` (the tilted risk), with its :math:`t \to 0` limit, the
    mean. Max-shifted log-sum-exp, in float64 so that the closed form stays accurate next to the limit."""
    if abs(tilt) < _ORDER_EPS:
        return values.mean()
    wide = values.double()
    return ((torch.logsumexp(tilt * wide, dim=0) - math.log(values.numel())) / tilt).to(values.dtype)


def iris_loss(
    policy_real_logps: torch.Tensor,
    policy_generated_logps: torch.Tensor,
    ref_real_logps: torch.Tensor,
    ref_generated_logps: torch.Tensor,
    beta: float = 0.1,
    alpha: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""IRIS objective: the Rényi–Donsker–Varadhan bound of order α (Liao et al. 2026, "Interpolative Rényi
    Iterative Self-play"; our reconstruction from the variational form of Birrell et al., SIMODS 2021; see
    `docs/methods.md`).

    With the discriminator :math:`g = \beta h`, N annotated and M generated sequences of the batch:

    .. math:: L = \frac{1}{1-\alpha}\log\frac{1}{N}\sum_i e^{(1-\alpha)(-\beta h_{r,i})}
                + \frac{1}{\alpha}\log\frac{1}{M}\sum_j e^{\alpha\beta h_{g,j}}

    Its gradient is :math:`-\sum_i w_i \nabla\beta h_{r,i} + \sum_j v_j \nabla\beta h_{g,j}` with
    :math:`w = \mathrm{softmax}((\alpha-1)\beta h_r)` and :math:`v = \mathrm{softmax}(\alpha\beta h_g)`.
    α → 1 gives the Donsker–Varadhan (KL) bound :math:`-\overline{\beta h_r} + \log\overline{e^{\beta h_g}}`, used
    exactly for :math:`|\alpha - 1| < 10^{-4}`; α → 0 makes the second term the mean. α = ½ tilts both terms
    equally; α = 2 is the χ² order.

    Returns:
        `(loss, real_weights, generated_weights)`: the scalar batch objective and the detached weights w, v
        (each sums to 1).
    """
    _check_same_shape(policy_real_logps=policy_real_logps, ref_real_logps=ref_real_logps)
    _check_same_shape(policy_generated_logps=policy_generated_logps, ref_generated_logps=ref_generated_logps)
    _check_positive("beta", beta)
    if not (isinstance(alpha, int | float) and math.isfinite(alpha) and alpha > 0):
        raise ValueError(
            f"`alpha` (the Rényi order) must be a finite number > 0, got {alpha!r}. Use alpha=1.0 for the KL "
            "(Donsker–Varadhan) limit, 0.5 for the smoothest weighting, 2.0 for the chi-squared order."
        )
    real_scores = beta * (policy_real_logps - ref_real_logps)
    generated_scores = beta * (policy_generated_logps - ref_generated_logps)
    loss = _tilted_mean(-real_scores, 1.0 - alpha) + _tilted_mean(generated_scores, alpha)
    with torch.no_grad():
        real_weights = torch.softmax((alpha - 1.0) * real_scores.double(), dim=0).to(real_scores.dtype)
        generated_weights = torch.softmax(alpha * generated_scores.double(), dim=0).to(generated_scores.dtype)
    return loss, real_weights, generated_weights


def space_loss(
    policy_real_logps: torch.Tensor,
    policy_generated_logps: torch.Tensor,
    ref_real_logps: torch.Tensor,
    ref_generated_logps: torch.Tensor,
    mu: float = 1.0,
) -> torch.Tensor:
    r"""SPACE loss (Wang et al., NeurIPS 2025): noise-contrastive estimation of annotated vs generated responses.

    With :math:`\sigma_\mu(x) = 1/(1 + \mu e^{-x})` and the unscaled log-ratios h (no β):

    .. math:: \ell_i = -\log\sigma_\mu(h_{r,i}) - \mu\log\big(1 - \sigma_\mu(h_{g,i})\big)
                     = -\log\sigma(h_{r,i} - \log\mu) - \mu\log\sigma(\log\mu - h_{g,i}).

    Unlike SPIN, it is not invariant to a shared shift of the two log-ratios, so it pins their absolute values.

    Returns:
        The per-pair losses.
    """
    _check_same_shape(
        policy_real_logps=policy_real_logps,
        policy_generated_logps=policy_generated_logps,
        ref_real_logps=ref_real_logps,
        ref_generated_logps=ref_generated_logps,
    )
    _check_positive("mu", mu)
    log_mu = math.log(mu)
    real_logratios = policy_real_logps - ref_real_logps
    generated_logratios = policy_generated_logps - ref_generated_logps
    return -F.logsigmoid(real_logratios - log_mu) - mu * F.logsigmoid(log_mu - generated_logratios)


def _check_probabilities(name: str, probs: torch.Tensor) -> None:
    if probs.numel() and (not torch.isfinite(probs).all() or probs.min() < 0 or probs.max() > 1):
        raise ValueError(f"`{name}` must hold probabilities in [0, 1], got values in [{probs.min()}, {probs.max()}].")


def sppo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    chosen_win_prob: torch.Tensor,
    rejected_win_prob: torch.Tensor,
    beta: float = 0.001,
) -> torch.Tensor:
    r"""SPPO loss (Wu et al. 2024, "Self-Play Preference Optimization", Eq. 3.6), the per-pair form of the SPPO and
    RSPO reference code (chosen = best-judged of the K samples, rejected = worst).

    With η = 1/β and :math:`\hat P(y \succ \pi_t)` the estimated win probability against the current policy:

    .. math:: \ell_i = \tfrac12\Big[\big(h_{c,i} - \eta(\hat P_{c,i} - \tfrac12)\big)^2
                     + \big(h_{l,i} - \eta(\hat P_{l,i} - \tfrac12)\big)^2\Big].

    Returns:
        The per-pair losses.
    """
    _check_same_shape(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
        chosen_win_prob=chosen_win_prob,
        rejected_win_prob=rejected_win_prob,
    )
    _check_positive("beta", beta)
    _check_probabilities("chosen_win_prob", chosen_win_prob)
    _check_probabilities("rejected_win_prob", rejected_win_prob)
    eta = 1.0 / beta
    chosen_error = (policy_chosen_logps - ref_chosen_logps) - eta * (chosen_win_prob - 0.5)
    rejected_error = (policy_rejected_logps - ref_rejected_logps) - eta * (rejected_win_prob - 0.5)
    return 0.5 * (chosen_error**2 + rejected_error**2)


def rspo_regularizer(
    policy_logps: torch.Tensor,
    anchor_logps: torch.Tensor,
    kind: str,
    log_ratio_clip: float = 10.0,
) -> torch.Tensor:
    r"""RSPO regularizers towards the initial model μ (Tang et al. 2025, "Regularized Self-Play Alignment of Large
    Language Models", arXiv 2503.00030), per sequence, with :math:`d = \log\pi_\theta(y|x) - \log\mu(y|x)` and the
    clip c applied in log space before exponentiating:

    - `reverse_kl`: :math:`d^2`
    - `forward_kl_is`: :math:`e^{\min(-d,\,c)}` (μ/πθ, importance-sampled forward KL)
    - `chi2`: :math:`e^{\min(d,\,c)}` (πθ/μ)
    - `forward_kl`: :math:`-d = \log\mu(y|x) - \log\pi_\theta(y|x)` for a response **sampled from μ**: its mean is a
      Monte-Carlo estimate of :math:`\mathrm{KL}(\mu\,\|\,\pi_\theta)`, and its gradient is that of the NLL of μ's
      samples, :math:`-\nabla\log\pi_\theta(y|x)` (the log μ term is a constant).

    The trainer adds λ·(mean over chosen + mean over rejected) of the first three, as the reference RSPO code does,
    and λ·(mean over the μ samples, one per pair) of `forward_kl`, which is meaningless on the self-play samples.

    Returns:
        The per-sequence regularizer values.
    """
    _check_same_shape(policy_logps=policy_logps, anchor_logps=anchor_logps)
    _check_positive("log_ratio_clip", log_ratio_clip)
    log_ratio = policy_logps - anchor_logps
    if kind == "reverse_kl":
        return log_ratio**2
    if kind == "forward_kl_is":
        return torch.exp(torch.clamp(-log_ratio, max=log_ratio_clip))
    if kind == "chi2":
        return torch.exp(torch.clamp(log_ratio, max=log_ratio_clip))
    if kind == "forward_kl":
        return -log_ratio
    raise ValueError(f"`kind` must be one of {RSPO_REGULARIZERS}, got {kind!r}.")


def forward_kl_regularizer(
    policy_logps: torch.Tensor,
    anchor_logps: torch.Tensor | None,
    lengths: torch.Tensor,
    reduction: str = "sum",
) -> torch.Tensor:
    r"""RSPO's `forward_kl` term on B responses :math:`y_b` sampled from μ, reduced to one scalar.

    `policy_logps` / `anchor_logps` are the per-sequence sums :math:`\log\pi_\theta(y_b|x_b)` / :math:`\log\mu(y_b|x_b)`
    and `lengths` the number of scored tokens :math:`|y_b|` of each sample. With :math:`L = \max_b |y_b|`:

    - `sum` (ours): :math:`\frac{1}{B}\sum_b \big(\log\mu(y_b) - \log\pi_\theta(y_b)\big)`, the Monte-Carlo estimate of
      :math:`\mathrm{KL}(\mu\,\|\,\pi_\theta)` per sequence.
    - `padded_token_mean` (the original's): :math:`\frac{1}{B\,L}\sum_b \big(\log\mu(y_b) - \log\pi_\theta(y_b)\big)`.
      xiaohangt/RSPO `sppo/trainer_reg.py` (`get_batch_loss_metrics` and `sppo_loss`, loss type `sppo_forward`)
      multiplies the per-token log-probs of the tokenised `reference_response` batch by `attention_mask[:, 1:]` and
      takes `-model_logp_reference_responses.mean()` over the whole padded ``[B, L]`` tensor: padding positions count
      in the denominator as zeros, so every sequence is divided by the batch's longest one, not by its own length.

    `anchor_logps=None` drops the :math:`\log\mu` term, which is constant in θ: the value is then exactly the
    original's `reg_loss` (it has no μ term) and the gradient is the same either way.

    Returns:
        A scalar tensor.
    """
    _check_same_shape(policy_logps=policy_logps, lengths=lengths)
    if anchor_logps is not None:
        _check_same_shape(policy_logps=policy_logps, anchor_logps=anchor_logps)
    if reduction not in FORWARD_KL_REDUCTIONS:
        raise ValueError(f"`reduction` must be one of {FORWARD_KL_REDUCTIONS}, got {reduction!r}.")
    if policy_logps.numel() == 0:
        raise ValueError("`policy_logps` is empty: the forward KL needs at least one sample from the anchor.")
    if (lengths < 0).any():
        raise ValueError("`lengths` must be >= 0 (scored token counts of the anchor samples).")
    per_sequence = -policy_logps if anchor_logps is None else anchor_logps - policy_logps
    if reduction == "sum":
        return per_sequence.mean()
    longest = lengths.max().clamp(min=1).to(per_sequence.dtype)
    return per_sequence.mean() / longest


def win_probabilities(preferences: torch.Tensor, exclude_self: bool = False) -> torch.Tensor:
    r"""Estimated :math:`P(y_i \succ \pi_t) = \frac{1}{K}\sum_j P(y_i \succ y_j)` from a preference matrix over K
    samples of one prompt, `preferences[..., i, j]` = :math:`P(y_i \succ y_j)`.

    The mean includes the diagonal (½), as the SPPO/RSPO reference code does; `exclude_self=True` averages over
    :math:`j \neq i` only.

    Returns:
        A tensor of shape `preferences.shape[:-1]`.
    """
    if preferences.dim() < 2 or preferences.shape[-1] != preferences.shape[-2]:
        raise ValueError(f"`preferences` must have shape [..., K, K], got {tuple(preferences.shape)}.")
    _check_probabilities("preferences", preferences)
    num_samples = preferences.shape[-1]
    if not exclude_self:
        return preferences.mean(dim=-1)
    if num_samples < 2:
        raise ValueError("`exclude_self=True` needs K >= 2 samples per prompt.")
    off_diagonal = preferences.sum(dim=-1) - preferences.diagonal(dim1=-2, dim2=-1)
    return off_diagonal / (num_samples - 1)


def distribution_gap(
    ref_real_logps: torch.Tensor,
    ref_generated_logps: torch.Tensor,
    real_lengths: torch.Tensor,
    generated_lengths: torch.Tensor,
    current: torch.Tensor | None = None,
) -> float:
    r"""IRIS's distributional gap :math:`\hat D_t = \overline{\log\pi_t(y')/|y'|} - \overline{\log\pi_t(y)/|y|}`:
    the per-token log-likelihood π_t gives its own samples y' minus what it gives the annotated responses y (0 when
    π_t equals the data distribution), from the reference pass of iteration t (see `docs/methods.md`).

    Args:
        ref_real_logps, ref_generated_logps: π_t's summed log-probs of the annotated / generated response of each row.
        real_lengths, generated_lengths: the number of tokens the trainer scored in each response, i.e. AFTER
            truncation (`SelfPlayTrainerBase.completion_lengths`), so that each sum is divided by its own token count.
        current: optional boolean mask (or integer indices) of the rows whose generated response is π_t's own sample
            of this iteration. Rows mixed in from earlier iterations (π_{t-1}'s samples) are left out of BOTH means,
            so each term averages over the same prompts. `None` uses every row.
    """
    _check_same_shape(ref_real_logps=ref_real_logps, real_lengths=real_lengths)
    _check_same_shape(ref_generated_logps=ref_generated_logps, generated_lengths=generated_lengths)
    _check_same_shape(ref_real_logps=ref_real_logps, ref_generated_logps=ref_generated_logps)
    if current is not None:
        current = torch.as_tensor(current)
        if current.dtype == torch.bool:
            if current.shape != ref_real_logps.shape:
                raise ValueError(
                    f"`current` must be a boolean mask with one entry per row ({ref_real_logps.numel()}), got shape "
                    f"{tuple(current.shape)}."
                )
        elif current.dtype.is_floating_point or current.dim() != 1:
            raise ValueError("`current` must be a boolean mask or a 1-D tensor of integer row indices.")
        ref_real_logps, ref_generated_logps = ref_real_logps[current], ref_generated_logps[current]
        real_lengths, generated_lengths = real_lengths[current], generated_lengths[current]
    if ref_real_logps.numel() == 0:
        raise ValueError("`distribution_gap` needs at least one row of the current iteration; `current` selects none.")
    if (real_lengths <= 0).any() or (generated_lengths <= 0).any():
        raise ValueError(
            "`real_lengths` and `generated_lengths` must be > 0 (the scored completion token counts); a row with no "
            "scored token has no per-token log-likelihood: drop it, or raise `max_length` / set `max_prompt_length`."
        )
    generated = (ref_generated_logps.double() / generated_lengths.double()).mean()
    real = (ref_real_logps.double() / real_lengths.double()).mean()
    return float(generated - real)


def iris_alpha(
    schedule: str,
    iteration: int,
    num_iterations: int,
    alpha: float = 1.0,
    alpha_start: float = 2.0,
    alpha_end: float = 0.5,
    gap: float | None = None,
    initial_gap: float | None = None,
) -> float:
    r"""The Rényi order α_t of iteration t (0-based) under IRIS's order schedule (see `docs/methods.md`).

    - `constant`: α.
    - `linear`: from `alpha_start` at the first iteration to `alpha_end` at the last.
    - `adaptive`: :math:`\alpha_t = \alpha_{end} + (\alpha_{start} - \alpha_{end})\,
      \mathrm{clip}(|\hat D_t| / |\hat D_0|, 0, 1)` with `gap` = :math:`\hat D_t`, `initial_gap` = :math:`\hat D_0`
      (see :func:`distribution_gap`): sharp while π_t is as far from the data as π_0 was, smooth as the gap closes.
      Magnitudes make the rule work whatever the sign of the gap (on sampled responses :math:`\hat D_0` is often
      negative: π_0 gives its temperature-1 samples a lower per-token likelihood than the annotated answers); a gap
      that grows past :math:`|\hat D_0|` keeps `alpha_start`. At t = 0, `gap` = `initial_gap`, so
      :math:`\alpha_0 = \alpha_{start}`. :math:`\hat D_0 = 0` leaves no scale to measure progress against: the
      ratio is taken as 1 (its limit as :math:`|\hat D_0| \to 0` for any non-zero gap), so α stays at `alpha_start`.
    """
    if not (isinstance(num_iterations, int) and num_iterations >= 1):
        raise ValueError(f"`num_iterations` must be an integer >= 1, got {num_iterations!r}.")
    if not (isinstance(iteration, int) and 0 <= iteration < num_iterations):
        raise ValueError(f"`iteration` must be an integer in [0, {num_iterations - 1}], got {iteration!r}.")
    if schedule == "constant":
        result = alpha
    elif schedule == "linear":
        fraction = iteration / (num_iterations - 1) if num_iterations > 1 else 0.0
        result = alpha_start + (alpha_end - alpha_start) * fraction
    elif schedule == "adaptive":
        if gap is None or initial_gap is None:
            raise ValueError("The `adaptive` alpha schedule needs `gap` and `initial_gap` (from distribution_gap).")
        if not (math.isfinite(gap) and math.isfinite(initial_gap)):
            raise ValueError(f"`gap` and `initial_gap` must be finite, got {gap!r} and {initial_gap!r}.")
        ratio = min(abs(gap) / abs(initial_gap), 1.0) if initial_gap != 0 else 1.0
        result = alpha_end + (alpha_start - alpha_end) * ratio
    else:
        raise ValueError(f"`alpha_schedule` must be one of {ALPHA_SCHEDULES}, got {schedule!r}.")
    _check_positive("alpha", result)
    return float(result)
