"""LD-DPO (``ld_alpha``) and WPO (``use_weighting``): TRL 1.16's options built on per-token data.

Both need quantities only the per-token log-probs give; ``upo.loss`` takes them as per-sequence
``[B]`` inputs (definitions in docs/losses.md, "LD-DPO" and "WPO"), ``upo.fused_loss`` computes
them from the kernels.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from upo.losses.inputs import VectorChecker, finite_number

# each log-prob sum -> the argument holding its part over the pair's shared tokens
SHARED_PART = {
    "policy_chosen_logps": "chosen_shared_logps",
    "policy_rejected_logps": "rejected_shared_logps",
    "ref_chosen_logps": "ref_chosen_shared_logps",
    "ref_rejected_logps": "ref_rejected_shared_logps",
}
WPO_ARGUMENTS = ("chosen_wpo_weights", "rejected_wpo_weights")


def _refuse_unused(given: dict[str, Any], reason: str) -> None:
    unused = [name for name, value in given.items() if value is not None]
    if unused:
        raise ValueError(f"{unused[0]} is given but {reason}")


def ld_weighted(
    vector: VectorChecker,
    ld_alpha: Any,
    sums: dict[str, Tensor | None],
    shared: dict[str, Any],
) -> dict[str, Tensor | None]:
    """``shared + ld_alpha * (S - shared)`` for every log-prob sum in ``sums`` (keyed by argument name).

    ``shared`` maps ``chosen_shared_logps`` etc. to the caller's values. Without ``ld_alpha`` the
    sums come back unchanged and no shared value may be given.
    """
    if ld_alpha is None:
        _refuse_unused(shared, "ld_alpha is None (LD-DPO is off)")
        return dict(sums)
    ld_alpha = finite_number(ld_alpha, "ld_alpha", "a number in [0, 1] or None")
    if not 0.0 <= ld_alpha <= 1.0:
        raise ValueError(f"ld_alpha must lie in [0, 1], got {ld_alpha}")
    weighted = dict(sums)
    for sum_name, shared_name in SHARED_PART.items():
        if sums[sum_name] is None:  # no reference
            _refuse_unused({shared_name: shared[shared_name]}, f"{sum_name} is not")
            continue
        if shared[shared_name] is None:
            raise ValueError(
                f"{shared_name} is required with ld_alpha: the sum of the response's log-probs over the "
                "first min(n_c, n_r) response tokens of its pair (docs/losses.md, LD-DPO)"
            )
        read = vector.reference_logps if shared_name.startswith("ref_") else vector.logps
        part = read(shared[shared_name], shared_name)
        weighted[sum_name] = part + ld_alpha * (sums[sum_name] - part)
    return weighted


def wpo_pair_weights(
    vector: VectorChecker,
    use_weighting: Any,
    weights: dict[str, Any],
    names: Sequence[str],
    specs: Sequence[Any],
) -> Tensor | None:
    """WPO's detached per-pair weight ``w_c * w_r`` (None when ``use_weighting`` is off)."""
    if not isinstance(use_weighting, bool):
        raise ValueError(f"use_weighting must be True or False, got {use_weighting!r}")
    if not use_weighting:
        _refuse_unused(weights, "use_weighting is False")
        return None
    refused = [name for name, spec in zip(names, specs) if not spec.weighting]
    if refused:
        raise ValueError(
            f"use_weighting (WPO) is not available for loss_type {refused}: these losses sort the pairs of the "
            "batch, which would misalign the per-pair weights (TRL refuses this combination too)"
        )
    factors = []
    for name in WPO_ARGUMENTS:
        if weights[name] is None:
            raise ValueError(
                f"{name} is required with use_weighting: exp(mean over the response's tokens of "
                "log p(y_t) - log sum_v p_t(v)^2) (docs/losses.md, WPO)"
            )
        factor = vector.logps(weights[name], name).detach()
        if bool((factor < 0).any()):
            raise ValueError(f"{name} must be >= 0 (an exponential)")
        factors.append(factor)
    return factors[0] * factors[1]
