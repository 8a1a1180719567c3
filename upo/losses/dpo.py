"""The reference-based DPO family, with TRL's names and formulas (docs/losses.md, "DPO family").

Notation: ``rho = S - R`` (log-ratio of a response), ``h = rho_c - rho_r`` (margin),
``eps`` = ``label_smoothing``, ``ls`` = log-sigmoid. Each function returns the ``[B]`` per-pair loss.
"""
from __future__ import annotations

import math

import torch

from upo.losses.ops import log_sigmoid, smoothed_logistic
from upo.losses.registry import NO_METRICS, LossContext, register_loss


@register_loss("sigmoid", needs_reference=True)
def _sigmoid_loss(ctx: LossContext):
    """DPO: ``-(1-eps) ls(beta h) - eps ls(-beta h)``."""
    return smoothed_logistic(ctx.beta * ctx.margin, ctx.label_smoothing), NO_METRICS


@register_loss("robust", needs_reference=True)
def _robust_loss(ctx: LossContext):
    """rDPO: ``(-(1-eps) ls(beta h) + eps ls(-beta h)) / (1 - 2 eps)``."""
    # Unbiased under label noise eps: (1-eps) L(h) + eps L(-h) = -ls(beta h).
    logits, eps = ctx.beta * ctx.margin, ctx.label_smoothing
    return (-(1 - eps) * log_sigmoid(logits) + eps * log_sigmoid(-logits)) / (1 - 2 * eps), NO_METRICS


@register_loss("hinge", needs_reference=True)
def _hinge_loss(ctx: LossContext):
    """SLiC / RSO: ``relu(1 - beta h)``."""
    return torch.relu(1 - ctx.beta * ctx.margin), NO_METRICS


@register_loss("ipo", needs_reference=True, needs_lengths=True)
def _ipo_loss(ctx: LossContext):
    """IPO: ``(rho_c/n_c - rho_r/n_r - 1/(2 beta))^2``."""
    # TRL (confirmed with the IPO authors) averages log-ratios per token so that beta
    # does not depend on response length.
    margin = ctx.chosen_logratios / ctx.chosen_lengths - ctx.rejected_logratios / ctx.rejected_lengths
    return (margin - 1 / (2 * ctx.beta)) ** 2, NO_METRICS


@register_loss("exo_pair", needs_reference=True)
def _exo_pair_loss(ctx: LossContext):
    """EXO: ``sig(bh)(ls(bh) - log(1-eps)) + sig(-bh)(ls(-bh) - log eps)``, ``bh = beta h``."""
    # KL(p_model || p_label) over {chosen, rejected} with p_label = (1 - eps, eps);
    # eps = 0 would make log(eps) infinite, so fall back to the paper's 1e-3.
    eps = ctx.label_smoothing or 1e-3
    logits = ctx.beta * ctx.margin
    chosen_term = torch.sigmoid(logits) * (log_sigmoid(logits) - math.log1p(-eps))
    rejected_term = torch.sigmoid(-logits) * (log_sigmoid(-logits) - math.log(eps))
    return chosen_term + rejected_term, NO_METRICS


@register_loss("nca_pair", needs_reference=True)
def _nca_pair_loss(ctx: LossContext):
    """NCA: ``-ls(beta rho_c) - ls(-beta rho_c)/2 - ls(-beta rho_r)/2``."""
    chosen_rewards = ctx.beta * ctx.chosen_logratios
    rejected_rewards = ctx.beta * ctx.rejected_logratios
    per_pair = (
        -log_sigmoid(chosen_rewards) - 0.5 * log_sigmoid(-chosen_rewards) - 0.5 * log_sigmoid(-rejected_rewards)
    )
    return per_pair, NO_METRICS


@register_loss("bco_pair", needs_reference=True, options={"bco_delta": None})
def _bco_pair_loss(ctx: LossContext):
    """BCO: ``-ls(beta rho_c - delta) - ls(-(beta rho_r - delta))``."""
    chosen_rewards = ctx.beta * ctx.chosen_logratios
    rejected_rewards = ctx.beta * ctx.rejected_logratios
    if ctx.options["bco_delta"] is None:
        # Stateless stand-in for TRL 0.x's running mean: this batch's mean reward.
        delta = torch.cat([chosen_rewards, rejected_rewards]).mean().detach()
    else:
        delta = ctx.scalar_option("bco_delta", chosen_rewards)
    per_pair = -log_sigmoid(chosen_rewards - delta) - log_sigmoid(-(rejected_rewards - delta))
    return per_pair, {"bco/delta": delta}


@register_loss("sppo_hard", needs_reference=True)
def _sppo_hard_loss(ctx: LossContext):
    """SPPO (hard labels): ``(rho_c - 1/(2 beta))^2 + (rho_r + 1/(2 beta))^2``."""
    half_inverse_beta = 0.5 / ctx.beta
    per_pair = (ctx.chosen_logratios - half_inverse_beta) ** 2 + (ctx.rejected_logratios + half_inverse_beta) ** 2
    return per_pair, NO_METRICS


@register_loss("apo_zero", needs_reference=True)
def _apo_zero_loss(ctx: LossContext):
    """APO-zero: ``1 - sig(beta rho_c) + sig(beta rho_r)``."""
    # Chosen better than the model's own outputs: push chosen up and rejected down.
    per_pair = 1 - torch.sigmoid(ctx.beta * ctx.chosen_logratios) + torch.sigmoid(ctx.beta * ctx.rejected_logratios)
    return per_pair, NO_METRICS


@register_loss("apo_down", needs_reference=True)
def _apo_down_loss(ctx: LossContext):
    """APO-down: ``sig(beta rho_c) + 1 - sig(beta h)``."""
    # Chosen worse than the model's own outputs: push both down, rejected more.
    return torch.sigmoid(ctx.beta * ctx.chosen_logratios) + 1 - torch.sigmoid(ctx.beta * ctx.margin), NO_METRICS


@register_loss("discopop", needs_reference=True, options={"discopop_tau": 0.05})
def _discopop_loss(ctx: LossContext):
    """DiscoPOP: ``(1 - m) (-ls(beta h)) + m exp(-beta h)``, ``m = sig(beta h / tau)``."""
    tau = ctx.float_option("discopop_tau", positive=True)
    logits = ctx.beta * ctx.margin
    modulation = torch.sigmoid(logits / tau)
    logistic = -log_sigmoid(logits)
    # m * exp(-logits) in log space: TRL's product is inf * 0 = NaN for very negative logits.
    exponential = torch.exp(log_sigmoid(logits / tau) - logits)
    return logistic * (1 - modulation) + exponential, NO_METRICS
