"""Preference losses over per-sequence log-probs: the public :func:`loss`, the registry, the families.

One file per family; adding a loss is one small function in its family's file, decorated
with :func:`register_loss` (the math of each: ``docs/losses.md``)::

    api.py             loss(), LossOutput: validate inputs, run the selected terms, weight them
    registry.py        LossContext, LossSpec, register_loss, available_losses, loss_spec
    dpo.py             reference-based DPO family (sigmoid, robust, hinge, ipo, exo_pair, ...)
    reference_free.py  simpo, orpo, nll / rpo
    kto.py             kto
    upo.py             upo: advantage-weighted likelihood on designer rewards + value loss
"""
from upo.losses.api import LossOutput, loss
from upo.losses.registry import LossContext, LossSpec, available_losses, loss_spec, register_loss

# Importing a family registers its losses.
from upo.losses import dpo, kto, reference_free, upo  # noqa: E402,F401  isort: skip

__all__ = ["LossContext", "LossOutput", "LossSpec", "available_losses", "loss", "loss_spec", "register_loss"]
