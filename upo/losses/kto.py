"""KTO (Ethayarajh et al. 2024, arXiv 2402.01306) on paired and unpaired data, and its reference point
(docs/losses.md, "KTO").

Per response, with ``rho = S - R`` and the reference point ``z``: a desirable one loses
``w_d (1 - sig(beta (rho - z)))``, an undesirable one ``w_u (1 - sig(beta (z - rho)))``. ``z``
estimates ``KL(policy || reference)`` from mismatched prompt/completion pairs
(:func:`kto_reference_point`), as the paper and TRL's ``KTOTrainer``.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from upo.losses.inputs import check_finite, compute_dtype
from upo.losses.registry import LossContext, UnpairedContext, register_loss, register_unpaired_loss

__all__ = ["kto_reference_point"]

# TRL KTOConfig's class weights, shared by both of KTOTrainer's losses; kto also takes its reference point
_CLASS_WEIGHT_OPTIONS = {"desirable_weight": 1.0, "undesirable_weight": 1.0}
_KTO_OPTIONS = {**_CLASS_WEIGHT_OPTIONS, "kl": None, "kl_policy_logps": None, "kl_ref_logps": None}


def kto_reference_point(kl_policy_logps: Tensor, kl_ref_logps: Tensor, *, process_group=None) -> Tensor:
    """KTO's reference point ``z = max(0, mean over processes of mean_i (kl_policy_i - kl_ref_i))``, detached.

    ``kl_policy_logps`` and ``kl_ref_logps`` (``[M]``) are the summed completion log-probs of
    mismatched pairs ``(x_i, y_j)``, ``j != i`` (TRL rotates the completions of a micro-batch by
    one), under the policy and the reference. The mean is this process's; when
    ``torch.distributed`` is initialised it is averaged over ``process_group`` (``None``: the
    default group) by one all-reduce, a mean of per-process means as TRL's, and clamped at 0 after
    that. Every process of the group must call it. Returns a 0-d tensor in the inputs' dtype
    (at least float32).
    """
    dtype = compute_dtype(kl_policy_logps, kl_ref_logps)
    for name, value in (("kl_policy_logps", kl_policy_logps), ("kl_ref_logps", kl_ref_logps)):
        if not isinstance(value, Tensor) or not value.is_floating_point() or value.ndim != 1 or not value.numel():
            got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"{name} must be a non-empty 1-D floating-point tensor [M], got {got}")
        check_finite(value, name)
    if kl_policy_logps.shape != kl_ref_logps.shape:
        raise ValueError(f"kl_policy_logps {tuple(kl_policy_logps.shape)} and kl_ref_logps "
                         f"{tuple(kl_ref_logps.shape)} must have the same shape")
    ref = kl_ref_logps.detach().to(device=kl_policy_logps.device, dtype=dtype)
    mean = (kl_policy_logps.detach().to(dtype) - ref).mean()
    if dist.is_available() and dist.is_initialized():
        mean = mean.clone()
        dist.all_reduce(mean, group=process_group)
        mean = mean / dist.get_world_size(process_group)
    return mean.clamp(min=0)


def _reference_point(ctx: LossContext | UnpairedContext, like: Tensor, own_logratios) -> Tensor:
    """``z`` from option ``kl`` (as given), from ``kl_policy_logps``/``kl_ref_logps`` (mismatched pairs), or
    else ``own_logratios()`` (paired data only: the batch's own responses)."""
    policy, ref = ctx.options["kl_policy_logps"], ctx.options["kl_ref_logps"]
    if (policy is None) != (ref is None):
        missing = "kl_policy_logps" if policy is None else "kl_ref_logps"
        raise ValueError(f"option {missing} of loss 'kto' is missing: give kl_policy_logps and kl_ref_logps, "
                         "or neither")
    if policy is not None:
        if ctx.options["kl"] is not None:
            raise ValueError("loss 'kto' takes option kl or kl_policy_logps/kl_ref_logps, not both")
        return kto_reference_point(policy, ref).to(device=like.device, dtype=like.dtype)
    if ctx.options["kl"] is not None:
        return ctx.scalar_option("kl", like)
    return own_logratios()


def _kto_losses(logratios: Tensor, kl: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """Per response: its loss if desirable, its loss if undesirable (unweighted)."""
    return 1 - torch.sigmoid(beta * (logratios - kl)), 1 - torch.sigmoid(beta * (kl - logratios))


def _class_weights(ctx) -> tuple[float, float]:
    return (ctx.float_option("desirable_weight", nonnegative=True),
            ctx.float_option("undesirable_weight", nonnegative=True))


@register_loss("kto", needs_reference=True, options=_KTO_OPTIONS)
def _kto_loss(ctx: LossContext):
    """``(w_d (1 - sig(beta (rho_c - z))) + w_u (1 - sig(beta (z - rho_r)))) / 2``, desirable = chosen.

    ``z``: see :func:`_reference_point`; without KL log-probs or ``kl``, the detached mean over the
    2B responses of ``rho``, clamped at 0 (paired data's estimate from matched responses).
    """
    desirable, undesirable = _class_weights(ctx)
    chosen, rejected = ctx.chosen_logratios, ctx.rejected_logratios
    kl = _reference_point(ctx, chosen, lambda: torch.cat([chosen, rejected]).mean().detach().clamp(min=0))
    chosen_losses, _ = _kto_losses(chosen, kl, ctx.beta)
    _, rejected_losses = _kto_losses(rejected, kl, ctx.beta)
    # Halved so that the batch mean is the mean over all 2B examples, as in TRL.
    return (desirable * chosen_losses + undesirable * rejected_losses) / 2, {"kto/kl": kl}


def _missing_reference_point():
    raise ValueError("loss 'kto' on unpaired data needs its reference point: options kl_policy_logps and "
                     "kl_ref_logps (mismatched prompt/completion pairs), or kl")


@register_unpaired_loss("kto")
def _kto_unpaired(ctx: UnpairedContext):
    """TRL's ``KTOTrainer``: per completion ``w_d (1 - sig(beta (rho - z)))`` or ``w_u (1 - sig(beta (z - rho)))``."""
    desirable, undesirable = _class_weights(ctx)
    logratios = ctx.logratios
    kl = _reference_point(ctx, logratios, _missing_reference_point)
    desirable_losses, undesirable_losses = _kto_losses(logratios, kl, ctx.beta)
    losses = torch.where(ctx.desirable, desirable * desirable_losses, undesirable * undesirable_losses)
    return losses, {"kl": kl}



def _apo_zero_unpaired_losses(logratios: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """Per response: its loss if desirable (pushed above the reference), if undesirable (below it)."""
    return 1 - torch.sigmoid(beta * logratios), torch.sigmoid(beta * logratios)


@register_loss("apo_zero_unpaired", needs_reference=True, options=_CLASS_WEIGHT_OPTIONS)
def _apo_zero_unpaired_loss(ctx: LossContext):
    """TRL's KTOTrainer ``apo_zero_unpaired`` on pairs (desirable = chosen), halved as ``kto``:
    ``(w_d (1 - sig(beta rho_c)) + w_u sig(beta rho_r)) / 2``; no reference point."""
    desirable, undesirable = _class_weights(ctx)
    chosen_losses, _ = _apo_zero_unpaired_losses(ctx.chosen_logratios, ctx.beta)
    _, rejected_losses = _apo_zero_unpaired_losses(ctx.rejected_logratios, ctx.beta)
    return (desirable * chosen_losses + undesirable * rejected_losses) / 2, {}


@register_unpaired_loss("apo_zero_unpaired")
def _apo_zero_unpaired_rows(ctx: UnpairedContext):
    """TRL's ``KTOTrainer``, ``loss_type="apo_zero_unpaired"`` (APO-zero, arXiv 2408.06266, per
    completion): ``w_d (1 - sig(beta rho))`` if desirable, else ``w_u sig(beta rho)``."""
    desirable, undesirable = _class_weights(ctx)
    desirable_losses, undesirable_losses = _apo_zero_unpaired_losses(ctx.logratios, ctx.beta)
    return torch.where(ctx.desirable, desirable * desirable_losses, undesirable * undesirable_losses), {}
