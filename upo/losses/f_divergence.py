"""f-divergence scores (``f_divergence_type``, TRL 1.16's names and formulas; docs/losses.md, "f-divergences").

A loss that reads scores uses ``f'(rho)`` of each response's log-ratio ``rho = S - R`` in place
of ``rho`` itself; ``reverse_kl`` (the default) is ``f'(rho) = rho``, i.e. plain DPO.
"""
from __future__ import annotations

import math
import torch
from torch import Tensor

from upo.losses.ops import log_sigmoid

F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# exp((a - 1) rho) is evaluated with its exponent capped here (TRL's cap for float32 and bfloat16;
# upo computes in float32 or float64, so float16 inputs get it too, where TRL caps at 11).
_ALPHA_EXPONENT_MAX = 80.0


def f_scores(logratios: Tensor, f_divergence_type: str, coef: float) -> Tensor:
    """``f'(exp(rho))`` written in terms of ``rho``, with TRL 1.16's constants."""
    if f_divergence_type == "reverse_kl":
        return logratios
    if f_divergence_type == "forward_kl":
        return 1 - torch.exp(-logratios)
    if f_divergence_type == "js_divergence":
        return math.log(2.0) + log_sigmoid(logratios)
    if f_divergence_type == "alpha_divergence":
        if abs(coef - 1.0) < 1e-6:  # the limit a -> 1 is reverse KL
            return logratios
        exponent = torch.clamp((coef - 1.0) * logratios, max=_ALPHA_EXPONENT_MAX)
        return torch.expm1(exponent) / (coef - 1.0)
    raise ValueError(f"f_divergence_type must be one of {', '.join(F_DIVERGENCES)}, got {f_divergence_type!r}")
