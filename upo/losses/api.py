"""``upo.loss``: a weighted sum of registered preference losses over per-sequence log-probs.

Every loss needs, per pair ``i`` of a batch of ``B`` pairs, only the summed response log-probs
of the policy ``S_c, S_r`` (chosen, rejected), optionally the reference model's ``R_c, R_r``,
the response token counts ``n_c, n_r``, designer rewards and values. The heavy work (log-probs
without logits) is done by the kernels; this is plain autograd over ``[B]`` vectors, so its
gradient gives one coefficient per sequence. Formulas of every loss: docs/losses.md.

Terms combine by weight: ``loss(..., loss_type=["sigmoid", "upo"], loss_weights=[1, 0.5])``.
Reward metrics are ``beta * (S - R)`` with a reference; without one ``beta * Sbar`` when
lengths are given (TRL's CPO-simpo / ORPO log averaged log-probs) and ``beta * S`` otherwise.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from upo.losses.inputs import (
    VectorChecker,
    batch_size,
    check_hyperparameters,
    check_options,
    check_requirements,
    compute_dtype,
    resolve_loss_types,
)
from upo.losses.metrics import reward_metrics, to_float
from upo.losses.registry import LossContext, loss_spec

__all__ = ["LossOutput", "loss"]


@dataclass
class LossOutput:
    """Result of :func:`loss`."""

    loss: Tensor  # scalar, mean over pairs of ``losses``
    losses: Tensor  # [B] weighted sum of the terms per pair
    terms: dict[str, Tensor]  # each term's batch mean before weighting
    metrics: dict[str, float]  # rewards/*, logps/*, per-term extras


def loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    *,
    loss_type: str | Sequence[str] = "sigmoid",
    loss_weights: Sequence[float] | None = None,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    aux_rewards_chosen: Tensor | None = None,
    aux_rewards_rejected: Tensor | None = None,
    values_chosen: Tensor | None = None,
    values_rejected: Tensor | None = None,
    **options: Any,
) -> LossOutput:
    """Weighted sum of preference losses over a batch of B pairs (formulas: docs/losses.md).

    All per-pair inputs are ``[B]`` (aux rewards ``[B]`` or ``[B, K]``); ``**options`` are
    the per-loss options, each checked against the options the selected losses declare.
    Raises ``ValueError`` naming the offending argument for any malformed input.
    """
    names, weights = resolve_loss_types(loss_type, loss_weights)
    specs = [loss_spec(name) for name in names]
    check_options(options, names, specs)
    beta, label_smoothing = check_hyperparameters(beta, label_smoothing)

    dtype = compute_dtype(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    batch = batch_size(policy_chosen_logps)
    device = policy_chosen_logps.device
    vector = VectorChecker(batch, dtype, device)

    chosen_logps = vector.logps(policy_chosen_logps, "policy_chosen_logps")
    rejected_logps = vector.logps(policy_rejected_logps, "policy_rejected_logps")
    ref_chosen = vector.optional_logps(ref_chosen_logps, "ref_chosen_logps")
    ref_rejected = vector.optional_logps(ref_rejected_logps, "ref_rejected_logps")
    if (ref_chosen is None) != (ref_rejected is None):
        missing = "ref_chosen_logps" if ref_chosen is None else "ref_rejected_logps"
        raise ValueError(f"{missing} is missing: give reference log-probs for both chosen and rejected, or neither")
    n_chosen = vector.lengths(chosen_lengths, "chosen_lengths")
    n_rejected = vector.lengths(rejected_lengths, "rejected_lengths")
    aux_chosen, aux_rejected = vector.aux_rewards(aux_rewards_chosen, aux_rewards_rejected)
    v_chosen = vector.values(values_chosen, "values_chosen")
    v_rejected = vector.values(values_rejected, "values_rejected")
    # Chosen and rejected share the prompt, so one value tensor serves both.
    v_chosen = v_rejected if v_chosen is None else v_chosen
    v_rejected = v_chosen if v_rejected is None else v_rejected

    supplied = {
        "ref_chosen_logps": ref_chosen,
        "ref_rejected_logps": ref_rejected,
        "chosen_lengths": n_chosen,
        "rejected_lengths": n_rejected,
        "aux_rewards_chosen": aux_chosen,
        "aux_rewards_rejected": aux_rejected,
    }
    for name, spec in zip(names, specs):
        check_requirements(name, spec, supplied)

    losses = torch.zeros(batch, dtype=dtype, device=device)
    terms: dict[str, Tensor] = {}
    extras: dict[str, Any] = {}
    for name, spec, weight in zip(names, specs, weights):
        ctx = LossContext(
            name=name,
            chosen_logps=chosen_logps,
            rejected_logps=rejected_logps,
            **supplied,  # the optional inputs, keyed by their LossContext field names
            values_chosen=v_chosen,
            values_rejected=v_rejected,
            beta=beta,
            label_smoothing=label_smoothing,
            options={key: options.get(key, default) for key, default in spec.options.items()},
        )
        per_pair, term_metrics = spec.fn(ctx)
        if per_pair.shape != (batch,):
            raise RuntimeError(f"loss {name!r} returned shape {tuple(per_pair.shape)}, expected ({batch},)")
        terms[name] = per_pair.mean()
        losses = losses + weight * per_pair
        extras.update(term_metrics)

    metrics = reward_metrics(chosen_logps, rejected_logps, ref_chosen, ref_rejected, n_chosen, n_rejected, beta)
    metrics.update({key: to_float(value) for key, value in extras.items()})
    return LossOutput(loss=losses.mean(), losses=losses, terms=terms, metrics=metrics)
