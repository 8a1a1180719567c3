"""Losses without a reference model: SimPO, ORPO, the NLL (RPO) term and TRL's ``sft`` (docs/losses.md).

``Sbar = S / n`` is a response's token-mean log-prob; ``eps`` = ``label_smoothing``.
"""
from __future__ import annotations

from upo.losses.ops import log1mexp, log_sigmoid, smoothed_logistic
from upo.losses.registry import NO_METRICS, LossContext, register_loss

_SIMPO_DEFAULT_GAMMA = 0.5  # TRL CPOConfig.simpo_gamma


@register_loss("simpo", needs_reference=False, needs_lengths=True, options={"gamma": None, "gamma_beta_ratio": None},
               f_divergence=True)
def _simpo_loss(ctx: LossContext):
    """SimPO: ``-(1-eps) ls(beta (Sbar_c - Sbar_r) - gamma) - eps ls(-(...))``.

    ``gamma`` is the absolute margin (TRL's ``CPOConfig.simpo_gamma``, default 0.5), or give
    ``gamma_beta_ratio`` (the SimPO repository's style, ``gamma = ratio * beta``).
    """
    has_gamma, has_ratio = ctx.options["gamma"] is not None, ctx.options["gamma_beta_ratio"] is not None
    if has_gamma and has_ratio:
        raise ValueError("options gamma and gamma_beta_ratio of loss 'simpo' are exclusive: give one")
    if has_gamma:
        gamma = ctx.float_option("gamma")
    elif has_ratio:
        gamma = ctx.float_option("gamma_beta_ratio") * ctx.beta
    else:
        gamma = _SIMPO_DEFAULT_GAMMA
    logits = ctx.beta * (ctx.chosen_mean_logps - ctx.rejected_mean_logps) - gamma
    return smoothed_logistic(logits, ctx.label_smoothing), NO_METRICS


# ORPO's log-odds are undefined at probability 1; keep the mean log-prob a hair below 0.
_ORPO_MAX_MEAN_LOGP = -1e-6


@register_loss("orpo", needs_reference=False, needs_lengths=True, options={"orpo_lambda": None}, f_divergence=True)
def _orpo_loss(ctx: LossContext):
    """ORPO: ``-Sbar_c - lambda ls(log_odds)``; lambda = ``orpo_lambda``, default ``beta`` (TRL)."""
    weight = ctx.beta if ctx.options["orpo_lambda"] is None else ctx.float_option("orpo_lambda", nonnegative=True)
    for logps, argument in ((ctx.chosen_logps, "policy_chosen_logps"), (ctx.rejected_logps, "policy_rejected_logps")):
        if bool((logps > 0).any()):
            raise ValueError(f"{argument} must be <= 0 (log-probabilities) for loss 'orpo'")
    chosen_mean = ctx.chosen_mean_logps.clamp(max=_ORPO_MAX_MEAN_LOGP)
    rejected_mean = ctx.rejected_mean_logps.clamp(max=_ORPO_MAX_MEAN_LOGP)
    log_odds = (chosen_mean - rejected_mean) - (log1mexp(chosen_mean) - log1mexp(rejected_mean))
    log_sigmoid_odds = log_sigmoid(log_odds)
    nll = -ctx.chosen_mean_logps
    metrics = {
        "orpo/nll_loss": nll.mean(),
        "orpo/log_odds_ratio": log_sigmoid_odds.mean(),  # TRL's names for these two
        "orpo/log_odds_chosen": log_odds.mean(),
    }
    return nll - weight * log_sigmoid_odds, metrics


@register_loss("nll", needs_reference=False, needs_lengths="chosen", options={"alpha": 1.0}, aliases=("rpo",),
               f_divergence=True)
def _nll_loss(ctx: LossContext):
    """NLL / RPO term: ``alpha * (-Sbar_c)``, meant to be combined with a preference loss."""
    # Per-response token-mean NLL averaged over pairs, as the RPO paper; TRL's ``sft`` (below)
    # averages over all chosen tokens. The two agree when the chosen responses have equal lengths.
    return ctx.float_option("alpha") * -ctx.chosen_mean_logps, NO_METRICS


@register_loss("sft", needs_reference=False, needs_lengths="chosen", f_divergence=True)
def _sft_loss(ctx: LossContext):
    """TRL 1.16's ``sft``: ``-sum_i S_c,i / sum_i n_c,i``, one token-mean NLL for the batch, per pair."""
    # Plain S_c even with ld_alpha (TRL reads the unweighted per-token log-probs here).
    chosen = ctx.chosen_logps if ctx.unweighted_chosen_logps is None else ctx.unweighted_chosen_logps
    return (-chosen.sum() / ctx.chosen_lengths.sum()).expand_as(chosen), NO_METRICS
