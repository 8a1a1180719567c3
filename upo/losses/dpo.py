"""The reference-based DPO family, with TRL 1.16's names and formulas (docs/losses.md, "DPO family").

Notation: ``rho = S - R`` (log-ratio of a response), ``h = rho_c - rho_r`` (margin),
``d = f'(rho_c) - f'(rho_r)`` (the f-divergence score margin, ``h`` under the default
``reverse_kl``), ``eps`` = ``label_smoothing``, ``ls`` = log-sigmoid. Each function returns the
``[B]`` per-pair loss.
"""
from __future__ import annotations

import math

import torch

from upo.losses.ops import log_sigmoid, smoothed_logistic
from upo.losses.registry import NO_METRICS, LossContext, register_loss


@register_loss("sigmoid", needs_reference=True, f_divergence=True)
def _sigmoid_loss(ctx: LossContext):
    """DPO: ``-ls(beta d)``; like TRL 1.16 it ignores ``label_smoothing`` (that is ``cdpo``)."""
    return -log_sigmoid(ctx.beta * ctx.score_margin), NO_METRICS


@register_loss("cdpo", needs_reference=True, f_divergence=True)
def _cdpo_loss(ctx: LossContext):
    """Conservative DPO: ``-(1-eps) ls(beta d) - eps ls(-beta d)`` (TRL <= 0.28's ``sigmoid`` with eps)."""
    return smoothed_logistic(ctx.beta * ctx.score_margin, ctx.label_smoothing), NO_METRICS


@register_loss("robust", needs_reference=True, f_divergence=True)
def _robust_loss(ctx: LossContext):
    """rDPO: ``(-(1-eps) ls(beta d) + eps ls(-beta d)) / (1 - 2 eps)``."""
    # Unbiased under label noise eps: (1-eps) L(h) + eps L(-h) = -ls(beta h).
    logits, eps = ctx.beta * ctx.score_margin, ctx.label_smoothing
    return (-(1 - eps) * log_sigmoid(logits) + eps * log_sigmoid(-logits)) / (1 - 2 * eps), NO_METRICS


@register_loss("hinge", needs_reference=True, f_divergence=True)
def _hinge_loss(ctx: LossContext):
    """SLiC / RSO: ``relu(1 - beta d)``."""
    return torch.relu(1 - ctx.beta * ctx.score_margin), NO_METRICS


def _mean_score_margin(ctx: LossContext):
    """``f'(rho_c)/n_c - f'(rho_r)/n_r``: the scores averaged per response token."""
    return ctx.chosen_scores / ctx.chosen_lengths - ctx.rejected_scores / ctx.rejected_lengths


@register_loss("ipo", needs_reference=True, needs_lengths=True, f_divergence=True)
def _ipo_loss(ctx: LossContext):
    """IPO: ``(f'(rho_c)/n_c - f'(rho_r)/n_r - 1/(2 beta))^2``."""
    # TRL (confirmed with the IPO authors) averages log-ratios per token so that beta
    # does not depend on response length.
    return (_mean_score_margin(ctx) - 1 / (2 * ctx.beta)) ** 2, NO_METRICS


@register_loss("sigmoid_norm", needs_reference=True, needs_lengths=True, f_divergence=True)
def _sigmoid_norm_loss(ctx: LossContext):
    """Length-normalised DPO: ``-ls(beta (f'(rho_c)/n_c - f'(rho_r)/n_r))``."""
    return -log_sigmoid(ctx.beta * _mean_score_margin(ctx)), NO_METRICS


@register_loss("exo_pair", needs_reference=True, f_divergence=True)
def _exo_pair_loss(ctx: LossContext):
    """EXO: ``sig(bd)(ls(bd) - log(1-eps)) + sig(-bd)(ls(-bd) - log eps)``, ``bd = beta d``."""
    # KL(p_model || p_label) over {chosen, rejected} with p_label = (1 - eps, eps).
    eps = ctx.label_smoothing
    if eps <= 0:  # log(0): TRL 1.16 refuses it too (older TRL silently used 1e-3)
        raise ValueError("label_smoothing must be > 0 for loss 'exo_pair' (the EXO paper recommends 1e-3)")
    logits = ctx.beta * ctx.score_margin
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


@register_loss("bco_pair", needs_reference=True, options={"bco_delta": 0.0})
def _bco_pair_loss(ctx: LossContext):
    """BCO: ``-ls(beta rho_c - delta) - ls(-(beta rho_r - delta))``; ``delta`` 0 as TRL 1.16."""
    chosen_rewards = ctx.beta * ctx.chosen_logratios
    rejected_rewards = ctx.beta * ctx.rejected_logratios
    delta_option = ctx.options["bco_delta"]
    if isinstance(delta_option, str):
        if delta_option != "batch_mean":
            raise ValueError(f"option bco_delta of loss 'bco_pair' must be a number or 'batch_mean', "
                             f"got {delta_option!r}")
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


@register_loss("discopop", needs_reference=True, options={"discopop_tau": 0.05}, f_divergence=True)
def _discopop_loss(ctx: LossContext):
    """DiscoPOP: ``(1 - m) (-ls(beta d)) + m exp(-beta d)``, ``m = sig(beta d / tau)``."""
    tau = ctx.float_option("discopop_tau", positive=True)
    logits = ctx.beta * ctx.score_margin
    modulation = torch.sigmoid(logits / tau)
    logistic = -log_sigmoid(logits)
    # m * exp(-logits) in log space: TRL's product is inf * 0 = NaN for very negative logits.
    exponential = torch.exp(log_sigmoid(logits / tau) - logits)
    return logistic * (1 - modulation) + exponential, NO_METRICS


def _sorted_logistic(ctx: LossContext, chosen: torch.Tensor, rejected: torch.Tensor):
    """AOT: ``-(1-eps) ls(beta z) - eps ls(-beta z)``, ``z = sort(chosen) - sort(rejected)`` over the batch."""
    # Entry i pairs the i-th smallest of each side, not pair i: only the batch mean is a loss.
    z = torch.sort(chosen).values - torch.sort(rejected).values
    return smoothed_logistic(ctx.beta * z, ctx.label_smoothing), NO_METRICS


@register_loss("aot", needs_reference=True, weighting=False)
def _aot_loss(ctx: LossContext):
    """AOT (paired): ``z = sort(S_c - S_r) - sort(R_c - R_r)``."""
    return _sorted_logistic(ctx, ctx.chosen_logps - ctx.rejected_logps,
                            ctx.ref_chosen_logps - ctx.ref_rejected_logps)


@register_loss("aot_unpaired", needs_reference=True, weighting=False)
def _aot_unpaired_loss(ctx: LossContext):
    """AOT (unpaired): ``z = sort(rho_c) - sort(rho_r)``."""
    return _sorted_logistic(ctx, ctx.chosen_logratios, ctx.rejected_logratios)
