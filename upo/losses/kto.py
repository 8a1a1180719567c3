"""KTO (Ethayarajh et al. 2024) on paired data (docs/losses.md, "KTO")."""
from __future__ import annotations

import torch

from upo.losses.registry import LossContext, register_loss


@register_loss(
    "kto",
    needs_reference=True,
    options={"desirable_weight": 1.0, "undesirable_weight": 1.0, "kl": None},
)
def _kto_loss(ctx: LossContext):
    """``(w_d (1 - sig(beta (rho_c - z))) + w_u (1 - sig(beta (z - rho_r)))) / 2``.

    Desirable = chosen, undesirable = rejected; ``z`` = option ``kl`` (used as given), by
    default the detached mean over the 2B responses of ``rho``, clamped at 0.
    """
    desirable = ctx.float_option("desirable_weight", nonnegative=True)
    undesirable = ctx.float_option("undesirable_weight", nonnegative=True)
    chosen, rejected = ctx.chosen_logratios, ctx.rejected_logratios
    if ctx.options["kl"] is None:
        # Paired data: estimate KL(policy || ref) from the batch's own responses.
        kl = torch.cat([chosen, rejected]).mean().detach().clamp(min=0)
    else:
        kl = ctx.scalar_option("kl", chosen)
    chosen_losses = 1 - torch.sigmoid(ctx.beta * (chosen - kl))
    rejected_losses = 1 - torch.sigmoid(ctx.beta * (kl - rejected))
    # Halved so that the batch mean is the mean over all 2B examples, as in TRL.
    return (desirable * chosen_losses + undesirable * rejected_losses) / 2, {"kto/kl": kl}
