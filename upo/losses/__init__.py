"""Preference losses over per-sequence log-probs: the public :func:`loss`, the registry, the families.

One file per family; adding a loss is one small function in its family's file, decorated
with :func:`register_loss` (the math of each: ``docs/losses.md``)::

    api.py             loss(), LossOutput: validate inputs, run the selected terms, weight them
    unpaired.py        unpaired_loss(): kto and upo over unpaired rows (TRL's prompt/completion/label)
    registry.py        LossContext, LossSpec, register_loss, available_losses, loss_spec
    dpo.py             reference-based DPO family (sigmoid, robust, hinge, ipo, exo_pair, aot, ...)
    reference_free.py  simpo, orpo, nll / rpo, sft
    kto.py             kto (paired and unpaired), kto_reference_point (KL from mismatched pairs)
    upo.py             upo: advantage-weighted likelihood on designer rewards + value loss
    variants.py        minor_dpo, alpha_dpo, mrpo
    f_divergence.py    f_divergence_type scores
    token_weighting.py ld_alpha (LD-DPO) and use_weighting (WPO)
"""
from upo.losses.api import LossOutput, loss
from upo.losses.registry import (LossContext, LossSpec, UnpairedContext, available_losses, loss_spec, register_loss,
                                 register_unpaired_loss)

# Importing a family registers its losses.
from upo.losses import dpo, kto, reference_free, upo, variants  # noqa: E402,F401  isort: skip
from upo.losses.kto import kto_reference_point  # noqa: E402
from upo.losses.unpaired import unpaired_loss, unpaired_losses  # noqa: E402

__all__ = ["LossContext", "LossOutput", "LossSpec", "UnpairedContext", "available_losses", "kto_reference_point",
           "loss", "loss_spec", "register_loss", "register_unpaired_loss", "unpaired_loss", "unpaired_losses"]
