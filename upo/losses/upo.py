"""UPO's auxiliary objective (arXiv 2405.17956): advantage-weighted likelihood + expectile value loss.

Per response: ``X = Sbar`` (``aux_normalize="mean"``) or ``S`` (``"sum"``), designer reward
``r_aux = sum_k w_k a_k``, advantage ``A = r_aux - V`` (V detached), AWR weight
``omega = min(exp(A / beta_aux), omega_max)`` without gradient, value residual ``u = r_aux - V``.
Per pair: ``lambda * (-(omega_c X_c + omega_r X_r) / 2) + (e(u_c) + e(u_r)) / 2`` with the
expectile loss ``e(u) = |tau - 1[u < 0]| u^2`` (trains V only; zero without ``values_*``).
Combined with a preference loss by ``loss_type=["sigmoid", "upo"]``. Derivation: docs/losses.md.
"""
from __future__ import annotations

import torch
from torch import Tensor

from upo.losses.inputs import check_finite
from upo.losses.registry import LossContext, register_loss

_UPO_OPTIONS = {
    "upo_lambda": 1.0,
    "beta_aux": 1.0,
    "omega_max": 20.0,
    "expectile": 0.7,
    "aux_weights": None,
    "baseline": None,  # "value" when values are given, else "pair_mean"; or "batch_mean"
    "aux_normalize": "mean",
}


def _combined_aux_reward(ctx: LossContext) -> tuple[Tensor, Tensor]:
    """r_aux = sum_k w_k a_k for chosen and rejected, [B] each."""
    aux_chosen, aux_rejected = ctx.aux_rewards_chosen, ctx.aux_rewards_rejected
    columns = aux_chosen.shape[1]
    weights = ctx.options["aux_weights"]
    if weights is None:
        weights = torch.ones(columns, dtype=aux_chosen.dtype, device=aux_chosen.device)
    else:
        weights = torch.as_tensor(weights, dtype=aux_chosen.dtype, device=aux_chosen.device).detach().reshape(-1)
        if weights.numel() != columns:
            raise ValueError(
                f"option aux_weights has {weights.numel()} entries, aux rewards have K = {columns} columns"
            )
        check_finite(weights, "option aux_weights")
    return aux_chosen @ weights, aux_rejected @ weights


def _baselines(ctx: LossContext, reward_chosen: Tensor, reward_rejected: Tensor) -> tuple[Tensor, Tensor]:
    """V(x) for the advantage, always detached (the value head learns only from L_V)."""
    has_values = ctx.values_chosen is not None
    kind = ctx.options["baseline"] or ("value" if has_values else "pair_mean")
    if kind == "value":
        if not has_values:
            raise ValueError("values_chosen (or values_rejected) is required by loss 'upo' with baseline='value'")
        return ctx.values_chosen.detach(), ctx.values_rejected.detach()
    if kind == "pair_mean":
        pair_mean = (reward_chosen + reward_rejected) / 2
        return pair_mean, pair_mean
    if kind == "batch_mean":
        batch_mean = torch.cat([reward_chosen, reward_rejected]).mean().expand_as(reward_chosen)
        return batch_mean, batch_mean
    raise ValueError(f"option baseline of loss 'upo' must be 'value', 'pair_mean' or 'batch_mean', got {kind!r}")


def _expectile_loss(residual: Tensor, tau: float) -> Tensor:
    """|tau - 1[u < 0]| u^2: tau > 0.5 pulls V towards an upper expectile of r_aux (IQL)."""
    weight = (tau - (residual < 0).to(residual.dtype)).abs()
    return weight * residual**2


@register_loss("upo", needs_reference=False, needs_aux_rewards=True, options=_UPO_OPTIONS, f_divergence=True)
def _upo_loss(ctx: LossContext):
    upo_lambda = ctx.float_option("upo_lambda")
    beta_aux = ctx.float_option("beta_aux", positive=True)
    omega_max = ctx.float_option("omega_max", positive=True)
    tau = ctx.float_option("expectile")
    if not 0 < tau < 1:
        raise ValueError(f"option expectile of loss 'upo' must lie in (0, 1), got {tau}")
    normalize = ctx.options["aux_normalize"]
    if normalize == "mean":
        chosen_x, rejected_x = ctx.chosen_mean_logps, ctx.rejected_mean_logps
    elif normalize == "sum":
        chosen_x, rejected_x = ctx.chosen_logps, ctx.rejected_logps
    else:
        raise ValueError(f"option aux_normalize of loss 'upo' must be 'mean' or 'sum', got {normalize!r}")

    reward_chosen, reward_rejected = _combined_aux_reward(ctx)
    baseline_chosen, baseline_rejected = _baselines(ctx, reward_chosen, reward_rejected)
    with torch.no_grad():
        advantage_chosen = reward_chosen - baseline_chosen
        advantage_rejected = reward_rejected - baseline_rejected
        # exp may overflow to inf; the clamp turns that into omega_max.
        omega_chosen = torch.exp(advantage_chosen / beta_aux).clamp(max=omega_max)
        omega_rejected = torch.exp(advantage_rejected / beta_aux).clamp(max=omega_max)
    # Halved so that the batch mean is the mean over all 2B responses.
    aux_per_pair = -(omega_chosen * chosen_x + omega_rejected * rejected_x) / 2

    if ctx.values_chosen is None:
        value_per_pair = torch.zeros_like(aux_per_pair)
    else:
        value_per_pair = (
            _expectile_loss(reward_chosen - ctx.values_chosen, tau)
            + _expectile_loss(reward_rejected - ctx.values_rejected, tau)
        ) / 2

    metrics = {
        "aux/advantage_mean": torch.cat([advantage_chosen, advantage_rejected]).mean(),
        "aux/weight_mean": torch.cat([omega_chosen, omega_rejected]).mean(),
        "aux/reward_chosen": reward_chosen.mean(),
        "aux/reward_rejected": reward_rejected.mean(),
        "value/loss": value_per_pair.mean(),
    }
    return upo_lambda * aux_per_pair + value_per_pair, metrics
