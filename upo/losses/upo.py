"""UPO's auxiliary objective (arXiv 2405.17956): advantage-weighted likelihood + expectile value loss.

Per response: ``X = Sbar`` (``aux_normalize="mean"``) or ``S`` (``"sum"``), designer reward
``r_aux = sum_k w_k a_k``, advantage ``A = r_aux - V`` (V detached), AWR weight
``omega = min(exp(A / beta_aux), omega_max)`` without gradient (``beta_aux="auto"``: the batch's advantage
standard deviation, floored at ``AUTO_BETA_AUX_FLOOR``), value residual ``u = r_aux - V``;
its loss is ``lambda * (-omega X) + e(u)`` with the expectile loss ``e(u) = |tau - 1[u < 0]| u^2``
(trains V only; zero without values). One function computes it per response
(:func:`_per_response`): a pair averages its two responses, an unpaired row is one response.
Combined with a preference loss by ``loss_type=["sigmoid", "upo"]``. Derivation: docs/losses.md.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from upo.losses.inputs import check_finite
from upo.losses.registry import LossContext, UnpairedContext, register_loss, register_unpaired_loss

_UPO_OPTIONS = {
    "upo_lambda": 1.0,
    "beta_aux": 1.0,
    "omega_max": 20.0,  # None: no cap (the exponent is still bounded, see MAX_EXPONENT)
    "expectile": 0.7,
    "aux_weights": None,
    "baseline": None,  # "value" when values are given, else "pair_mean" (paired) / "batch_mean" (unpaired)
    "aux_normalize": "mean",
}
# With omega_max=None the exponent A / beta_aux is capped here instead: exp(50) ~ 5e21 already puts all of a
# batch's weight on one response, and keeps omega * X and the batch's sums finite in float32 (max ~3e38),
# whose exp overflows to inf past 88.7 (inf * X would be a NaN loss).
MAX_EXPONENT = 50.0
# beta_aux="auto": the standard deviation of the batch's advantages, at least this (a batch whose advantages are
# all equal would otherwise divide by 0); rewards are O(1) by design (upo.rewards), so 0.01 is far below a spread.
AUTO_BETA_AUX_FLOOR = 0.01


@dataclass(frozen=True)
class _Settings:
    upo_lambda: float
    beta_aux: float | None  # None: "auto", the batch's advantage standard deviation
    omega_max: float | None
    tau: float
    normalize: str


def _settings(ctx: LossContext | UnpairedContext) -> _Settings:
    omega_max = None if ctx.options["omega_max"] is None else ctx.float_option("omega_max", positive=True)
    tau = ctx.float_option("expectile")
    if not 0 < tau < 1:
        raise ValueError(f"option expectile of loss 'upo' must lie in (0, 1), got {tau}")
    normalize = ctx.options["aux_normalize"]
    if normalize not in ("mean", "sum"):
        raise ValueError(f"option aux_normalize of loss 'upo' must be 'mean' or 'sum', got {normalize!r}")
    auto = isinstance(ctx.options["beta_aux"], str) and ctx.options["beta_aux"] == "auto"
    beta_aux = None if auto else ctx.float_option("beta_aux", positive=True)
    return _Settings(ctx.float_option("upo_lambda"), beta_aux, omega_max, tau, normalize)


def auto_beta_aux(advantage: Tensor) -> Tensor:
    """``beta_aux="auto"``: the advantages' standard deviation over the batch (population), at least
    ``AUTO_BETA_AUX_FLOOR``; no gradient. ``A / beta_aux`` then has unit spread in every batch."""
    return advantage.detach().std(unbiased=False).clamp_min(AUTO_BETA_AUX_FLOOR)


def _combined_aux_reward(ctx: LossContext | UnpairedContext, *aux: Tensor) -> list[Tensor]:
    """r_aux = sum_k w_k a_k of each ``[M, K]`` reward matrix: ``[M]`` each."""
    columns = aux[0].shape[1]
    weights = ctx.options["aux_weights"]
    if weights is None:
        weights = torch.ones(columns, dtype=aux[0].dtype, device=aux[0].device)
    else:
        weights = torch.as_tensor(weights, dtype=aux[0].dtype, device=aux[0].device).detach().reshape(-1)
        if weights.numel() != columns:
            raise ValueError(
                f"option aux_weights has {weights.numel()} entries, aux rewards have K = {columns} columns"
            )
        check_finite(weights, "option aux_weights")
    return [rewards @ weights for rewards in aux]


def _baseline_kind(ctx: LossContext | UnpairedContext, has_values: bool, allowed: tuple[str, ...]) -> str:
    kind = ctx.options["baseline"] or ("value" if has_values else allowed[-1])
    if kind not in allowed:
        raise ValueError(f"option baseline of loss 'upo' must be {' or '.join(map(repr, allowed))}"
                         f"{' on unpaired data (there is no pair)' if 'pair_mean' not in allowed else ''}, "
                         f"got {kind!r}")
    if kind == "value" and not has_values:
        arguments = "values_chosen (or values_rejected)" if isinstance(ctx, LossContext) else "values"
        raise ValueError(f"{arguments} is required by loss 'upo' with baseline='value'")
    return kind


def _expectile_loss(residual: Tensor, tau: float) -> Tensor:
    """|tau - 1[u < 0]| u^2: tau > 0.5 pulls V towards an upper expectile of r_aux (IQL)."""
    weight = (tau - (residual < 0).to(residual.dtype)).abs()
    return weight * residual**2


def _per_response(settings: _Settings, logps: Tensor, lengths: Tensor | None, reward: Tensor, baseline: Tensor,
                  values: Tensor | None) -> tuple[Tensor, dict[str, Tensor]]:
    """UPO's loss of each of ``M`` responses, ``lambda * (-omega X) + e(r_aux - V)``, and its parts."""
    if settings.normalize == "mean":
        if lengths is None:
            raise ValueError("loss 'upo' with aux_normalize='mean' needs the response lengths")
        x = logps / lengths
    else:
        x = logps
    with torch.no_grad():
        advantage = reward - baseline.detach()
        beta_aux = auto_beta_aux(advantage) if settings.beta_aux is None else advantage.new_tensor(settings.beta_aux)
        exponent = advantage / beta_aux
        if settings.omega_max is None:
            omega = torch.exp(exponent.clamp(max=MAX_EXPONENT))
        else:  # exp may overflow to inf; the clamp turns that into omega_max.
            omega = torch.exp(exponent).clamp(max=settings.omega_max)
    value = torch.zeros_like(x) if values is None else _expectile_loss(reward - values, settings.tau)
    parts = {"advantage": advantage, "omega": omega, "value": value, "beta_aux": beta_aux}
    return settings.upo_lambda * -(omega * x) + value, parts


def _metrics(parts: dict[str, Tensor], reward_chosen: Tensor, reward_rejected: Tensor) -> dict[str, Tensor]:
    advantage, omega = parts["advantage"], parts["omega"]
    metrics = {
        "aux/advantage_mean": advantage.mean(),
        "aux/advantage_std": advantage.std(unbiased=False),
        "aux/weight_mean": omega.mean(),
        "aux/weight_max": omega.max(),
        "aux/beta_aux": parts["beta_aux"],  # the temperature used: beta_aux, or the batch's with "auto"
        "value/loss": parts["value"].mean(),
    }
    # Unpaired rows may hold no desirable (or no undesirable) completion: its mean is left out, as TRL does.
    for key, rewards in (("aux/reward_chosen", reward_chosen), ("aux/reward_rejected", reward_rejected)):
        if rewards.numel():
            metrics[key] = rewards.mean()
    return metrics


@register_loss("upo", needs_reference=False, needs_aux_rewards=True, options=_UPO_OPTIONS, f_divergence=True)
def _upo_loss(ctx: LossContext):
    settings = _settings(ctx)
    reward_chosen, reward_rejected = _combined_aux_reward(ctx, ctx.aux_rewards_chosen, ctx.aux_rewards_rejected)
    rewards = torch.cat([reward_chosen, reward_rejected])  # the 2B responses, chosen first
    kind = _baseline_kind(ctx, ctx.values_chosen is not None, ("value", "batch_mean", "pair_mean"))
    values = None if ctx.values_chosen is None else torch.cat([ctx.values_chosen, ctx.values_rejected])
    if kind == "value":
        baseline = values
    elif kind == "pair_mean":
        baseline = ((reward_chosen + reward_rejected) / 2).repeat(2)
    else:
        baseline = rewards.mean().expand_as(rewards)
    lengths = None
    if settings.normalize == "mean":
        lengths = torch.cat([ctx._require("chosen_lengths"), ctx._require("rejected_lengths")])
    per_response, parts = _per_response(settings, torch.cat([ctx.chosen_logps, ctx.rejected_logps]), lengths,
                                        rewards, baseline, values)
    # A pair is its two responses, halved so that the batch mean is the mean over all 2B responses.
    per_pair = per_response.reshape(2, -1).mean(dim=0)
    return per_pair, _metrics(parts, reward_chosen, reward_rejected)


@register_unpaired_loss("upo")
def _upo_unpaired(ctx: UnpairedContext):
    settings = _settings(ctx)
    (rewards,) = _combined_aux_reward(ctx, ctx.aux_rewards)
    kind = _baseline_kind(ctx, ctx.values is not None, ("value", "batch_mean"))
    baseline = ctx.values if kind == "value" else rewards.mean().expand_as(rewards)
    lengths = ctx.lengths if settings.normalize == "mean" else None
    per_example, parts = _per_response(settings, ctx.logps, lengths, rewards, baseline, ctx.values)
    return per_example, _metrics(parts, rewards[ctx.desirable], rewards[~ctx.desirable])
