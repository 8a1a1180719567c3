"""DPO variants beside UPO in the project's seed: Minor DPO, alpha-DPO, MRPO (docs/losses.md, "DPO variants").

Each follows its paper; where the paper leaves a choice open, the authors' released code decides
(alpha-DPO: github.com/junkangwu/alpha-DPO, MRPO: github.com/thaihungle/MRPO), and the docstring
and docs/losses.md say which choices are upo's own (a stateless loss cannot keep running statistics).
"""
from __future__ import annotations

import torch
from torch import Tensor

from upo.losses.ops import log_sigmoid, smoothed_logistic
from upo.losses.registry import NO_METRICS, LossContext, register_loss


@register_loss("minor_dpo", needs_reference=True)
def _minor_dpo_loss(ctx: LossContext):
    """MinorDPO (Xie et al. 2024, arXiv 2408.09834, the MinorDPO objective): ``-ls(beta (rho_c - max(0, rho_r)))``.

    The reject penalty stops once the rejected response is no likelier than under the reference.
    """
    return -log_sigmoid(ctx.beta * (ctx.chosen_logratios - ctx.rejected_logratios.clamp(min=0))), NO_METRICS


_ALPHA_DPO_OPTIONS = {
    # the authors' training_configs/llama-3-8b-instruct-alpha-dpo.yaml
    "margin_alpha": 0.2,
    "gamma_beta_ratio": 0.6,
    "margin_mean": None,  # None: the batch's mean of M
    "margin_std": None,  # None: the batch's standard deviation of M (unbiased)
}


def _margin_statistic(ctx: LossContext, key: str, batch_value) -> Tensor:
    if ctx.options[key] is None:
        return batch_value()
    return ctx.scalar_option(key, ctx.chosen_logps)


@register_loss("alpha_dpo", needs_reference=True, needs_lengths=True, options=_ALPHA_DPO_OPTIONS)
def _alpha_dpo_loss(ctx: LossContext):
    """alpha-DPO (Wu et al. 2024, arXiv 2410.10148; ICML 2025 "AlphaDPO"), as the authors' ``alpha-dpo`` loss.

    ``u = Sbar_c - Sbar_r``, ``M = u - (Rbar_c - Rbar_r)`` (token means), ``z = (M - mean) / std``,
    loss ``-(1-eps) ls(beta (u - sg[alpha z + gamma/beta])) - eps ls(-beta (...))``. The authors keep
    mean and std as running averages over steps (decay 0.9, gathered over ranks); upo, stateless,
    uses the micro-batch's unless options ``margin_mean`` / ``margin_std`` give them.
    """
    alpha = ctx.float_option("margin_alpha")
    gamma_ratio = ctx.float_option("gamma_beta_ratio")
    policy_margin = ctx.chosen_mean_logps - ctx.rejected_mean_logps
    ref_margin = ctx.ref_chosen_logps / ctx.chosen_lengths - ctx.ref_rejected_logps / ctx.rejected_lengths
    with torch.no_grad():
        margin = policy_margin - ref_margin
        if ctx.options["margin_std"] is None and margin.numel() < 2:
            raise ValueError("loss 'alpha_dpo' normalises by the batch's standard deviation of the margin, which "
                             "needs at least 2 pairs: give options margin_mean and margin_std")
        mean = _margin_statistic(ctx, "margin_mean", margin.mean)
        std = _margin_statistic(ctx, "margin_std", margin.std)
        if ctx.options["margin_std"] is not None and not bool(std > 0):
            raise ValueError(f"option margin_std of loss 'alpha_dpo' must be > 0, got {float(std)}")
        # all margins equal: no spread to normalise, the adaptive part vanishes
        z = torch.where(std > 0, (margin - mean) / std.clamp(min=torch.finfo(std.dtype).tiny), 0.0)
        target = alpha * z + gamma_ratio
    per_pair = smoothed_logistic(ctx.beta * (policy_margin - target), ctx.label_smoothing)
    return per_pair, {"alpha_dpo/target_margin": target.mean()}


_MRPO_OPTIONS = {"mrpo_weights": None, "mrpo_eta": 0.1, "mrpo_eta_mode": "adaptive"}


def _clip_around(primary: Tensor, extra: Tensor, eta: Tensor) -> Tensor:
    """CTRO: each extra reference's log-prob kept within ``[(1+eta) R_p, (1-eta) R_p]`` (R_p <= 0)."""
    low = torch.minimum((1 + eta) * primary, (1 - eta) * primary).unsqueeze(1)
    high = torch.maximum((1 + eta) * primary, (1 - eta) * primary).unsqueeze(1)
    return torch.minimum(torch.maximum(extra, low), high)


def _mrpo_weights(ctx: LossContext, refs_chosen: Tensor, refs_rejected: Tensor) -> Tensor:
    """[B, M] weights of the references' inverse probabilities, rows summing to 1."""
    given = ctx.options["mrpo_weights"]
    columns = refs_chosen.shape[1]
    if given is None:
        if columns != 2:
            raise ValueError("option mrpo_weights of loss 'mrpo' is required with more than one extra reference: "
                             "the authors' adaptive weights (ARWC) are defined for two references")
        confidence = (refs_chosen - refs_rejected).abs()  # [B, 2]: primary, extra
        share = confidence[:, 1] / (confidence[:, 0] + confidence[:, 1] + 1e-6)  # the authors' alpha
        return torch.stack([share, 1 - share], dim=1)
    try:
        weights = torch.as_tensor(given, dtype=refs_chosen.dtype, device=refs_chosen.device).detach()
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"option mrpo_weights of loss 'mrpo' must be numbers, got {given!r}") from None
    weights = weights.expand(refs_chosen.shape[0], -1) if weights.ndim == 1 else weights
    if weights.shape != refs_chosen.shape:
        raise ValueError(f"option mrpo_weights of loss 'mrpo' must have {columns} entries (primary reference first) "
                         f"or shape {tuple(refs_chosen.shape)}, got {tuple(torch.as_tensor(given).shape)}")
    if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()) or bool((weights.sum(1) <= 0).any()):
        raise ValueError("option mrpo_weights of loss 'mrpo' must be finite, >= 0 and not all 0 in a row")
    return weights / weights.sum(dim=1, keepdim=True)


@register_loss("mrpo", needs_reference=True, options=_MRPO_OPTIONS)
def _mrpo_loss(ctx: LossContext):
    """MRPO (Le et al., AAAI 2025, arXiv 2405.16388), generalising the authors' two-reference code.

    ``ref_*_logps`` is the primary reference ``R_p`` (the initial policy), ``extra_ref_*_logps``
    ``[B, K]`` the others. Each extra is clipped around ``R_p`` (CTRO), then combined with it into
    ``R~ = -log sum_k w_k exp(-R_k)``; the loss is DPO's ``-ls(beta ((S_c - R~_c) - (S_r - R~_r)))``.
    """
    if ctx.ld_alpha is not None:
        raise ValueError("ld_alpha is not supported by loss 'mrpo' (its extra references have no shared-token sums)")
    extra_chosen = ctx._require("extra_ref_chosen_logps")
    extra_rejected = ctx._require("extra_ref_rejected_logps")
    eta = ctx.float_option("mrpo_eta", nonnegative=True)
    mode = ctx.options["mrpo_eta_mode"]
    primary_chosen, primary_rejected = ctx.ref_chosen_logps.detach(), ctx.ref_rejected_logps.detach()
    with torch.no_grad():
        if mode == "adaptive":  # split eta between chosen and rejected by their mean log-probs' sizes
            mean_chosen = torch.cat([primary_chosen[:, None], extra_chosen], 1).mean(1).abs()
            mean_rejected = torch.cat([primary_rejected[:, None], extra_rejected], 1).mean(1).abs()
            total = mean_chosen + mean_rejected
            scale = torch.where(total > 0, mean_chosen / total.clamp(min=torch.finfo(total.dtype).tiny), 0.5)
            eta_chosen, eta_rejected = eta * scale, eta * (1 - scale)
        elif mode == "fixed":
            eta_chosen = eta_rejected = torch.full_like(primary_chosen, eta)
        else:
            raise ValueError(f"option mrpo_eta_mode of loss 'mrpo' must be 'adaptive' or 'fixed', got {mode!r}")
        refs_chosen = torch.cat([primary_chosen[:, None], _clip_around(primary_chosen, extra_chosen, eta_chosen)], 1)
        refs_rejected = torch.cat(
            [primary_rejected[:, None], _clip_around(primary_rejected, extra_rejected, eta_rejected)], 1)
        # ARWC confidences read the references before clipping, as the authors' code does
        weights = _mrpo_weights(ctx, torch.cat([primary_chosen[:, None], extra_chosen], 1),
                                torch.cat([primary_rejected[:, None], extra_rejected], 1))
        combined_chosen = -torch.logsumexp(torch.log(weights) - refs_chosen, dim=1)
        combined_rejected = -torch.logsumexp(torch.log(weights) - refs_rejected, dim=1)
        clipped = torch.cat([refs_chosen[:, 1:] != extra_chosen, refs_rejected[:, 1:] != extra_rejected], 1)
    margin = (ctx.chosen_logps - combined_chosen) - (ctx.rejected_logps - combined_rejected)
    metrics = {"mrpo/primary_weight": weights[:, 0].mean(), "mrpo/clipped_fraction": clipped.double().mean()}
    return -log_sigmoid(ctx.beta * margin), metrics
