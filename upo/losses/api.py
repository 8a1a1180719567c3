"""``upo.loss``: a weighted sum of registered preference losses over per-sequence log-probs.

Every loss needs, per pair ``i`` of a batch of ``B`` pairs, only the summed response log-probs
of the policy ``S_c, S_r`` (chosen, rejected), optionally the reference model's ``R_c, R_r``,
the response token counts ``n_c, n_r``, designer rewards and values. The heavy work (log-probs
without logits) is done by the kernels; this is plain autograd over ``[B]`` vectors, so its
gradient gives one coefficient per sequence. Formulas of every loss: docs/losses.md.

Terms combine by weight: ``loss(..., loss_type=["sigmoid", "upo"], loss_weights=[1, 0.5])``.
Reward metrics are ``beta * (S - R)`` with a reference; without one ``beta * Sbar`` when
lengths are given (TRL's CPO-simpo / ORPO log averaged log-probs) and ``beta * S`` otherwise.
TRL 1.16's batch options (``f_divergence_type``, ``ld_alpha``, ``use_weighting``) are arguments
of :func:`loss`; the per-sequence inputs they need are defined in its docstring.
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
    check_f_divergence,
    check_finite_loss,
    check_hyperparameters,
    check_options,
    check_requirements,
    compute_dtype,
    resolve_loss_types,
)
from upo.losses.metrics import reward_metrics, to_float
from upo.losses.registry import LossContext, loss_spec
from upo.losses.token_weighting import ld_weighted, wpo_pair_weights

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
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    ld_alpha: float | None = None,
    chosen_shared_logps: Tensor | None = None,
    rejected_shared_logps: Tensor | None = None,
    ref_chosen_shared_logps: Tensor | None = None,
    ref_rejected_shared_logps: Tensor | None = None,
    use_weighting: bool = False,
    chosen_wpo_weights: Tensor | None = None,
    rejected_wpo_weights: Tensor | None = None,
    extra_ref_chosen_logps: Tensor | None = None,
    extra_ref_rejected_logps: Tensor | None = None,
    **options: Any,
) -> LossOutput:
    """Weighted sum of preference losses over a batch of B pairs (formulas: docs/losses.md).

    All per-pair inputs are ``[B]`` (aux rewards ``[B]`` or ``[B, K]``); ``**options`` are
    the per-loss options, each checked against the options the selected losses declare.
    Raises ``ValueError`` naming the offending argument for any malformed input, and for a loss
    that overflows the compute dtype from finite inputs. Reference log-probs are detached.

    TRL 1.16's batch options, with its names and defaults (docs/losses.md has the details):

    - ``f_divergence_type`` (``"reverse_kl"``, ``"forward_kl"``, ``"js_divergence"``,
      ``"alpha_divergence"`` with ``f_alpha_divergence_coef``): the losses that take it read
      ``f'(rho)`` instead of the log-ratio ``rho``; the metrics keep ``rho``.
    - ``ld_alpha`` (LD-DPO, in [0, 1]): every sum ``S`` (and ``R``) becomes
      ``shared + ld_alpha * (S - shared)``, feeding every loss but ``sft`` and the
      ``rewards/*`` and ``logps/*`` metrics, as in TRL. It needs ``chosen_shared_logps`` and
      ``rejected_shared_logps`` (policy, with gradient) and, when reference log-probs are given,
      ``ref_chosen_shared_logps`` and ``ref_rejected_shared_logps``: the sum of the response's
      per-token log-probs over its first ``min(n_c, n_r)`` response tokens (``n`` counts the
      tokens that have a log-prob, i.e. the shifted completion mask).
    - ``use_weighting`` (WPO): every term's per-pair loss is multiplied by
      ``chosen_wpo_weights * rejected_wpo_weights``, each response's detached
      ``exp(mean over its response tokens t of (log p_t(y_t) - log sum_v p_t(v)^2))``.

    MRPO reads further reference models as ``extra_ref_chosen_logps`` and
    ``extra_ref_rejected_logps`` (``[B, K]``, detached); ``ref_*_logps`` is its primary one.
    """
    names, weights = resolve_loss_types(loss_type, loss_weights)
    specs = [loss_spec(name) for name in names]
    check_options(options, names, specs)
    beta, label_smoothing = check_hyperparameters(beta, label_smoothing)
    f_alpha_divergence_coef = check_f_divergence(f_divergence_type, f_alpha_divergence_coef, names, specs)

    dtype = compute_dtype(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                          chosen_shared_logps, rejected_shared_logps)
    batch = batch_size(policy_chosen_logps)
    device = policy_chosen_logps.device
    vector = VectorChecker(batch, dtype, device)

    sums = {
        "policy_chosen_logps": vector.logps(policy_chosen_logps, "policy_chosen_logps"),
        "policy_rejected_logps": vector.logps(policy_rejected_logps, "policy_rejected_logps"),
        "ref_chosen_logps": vector.reference_logps(ref_chosen_logps, "ref_chosen_logps"),
        "ref_rejected_logps": vector.reference_logps(ref_rejected_logps, "ref_rejected_logps"),
    }
    if (sums["ref_chosen_logps"] is None) != (sums["ref_rejected_logps"] is None):
        missing = "ref_chosen_logps" if sums["ref_chosen_logps"] is None else "ref_rejected_logps"
        raise ValueError(f"{missing} is missing: give reference log-probs for both chosen and rejected, or neither")
    unweighted_chosen = sums["policy_chosen_logps"]
    shared = {
        "chosen_shared_logps": chosen_shared_logps,
        "rejected_shared_logps": rejected_shared_logps,
        "ref_chosen_shared_logps": ref_chosen_shared_logps,
        "ref_rejected_shared_logps": ref_rejected_shared_logps,
    }
    sums = ld_weighted(vector, ld_alpha, sums, shared)
    ld_alpha = None if ld_alpha is None else float(ld_alpha)
    pair_weights = wpo_pair_weights(vector, use_weighting, {"chosen_wpo_weights": chosen_wpo_weights,
                                                            "rejected_wpo_weights": rejected_wpo_weights},
                                    names, specs)
    chosen_logps, rejected_logps = sums["policy_chosen_logps"], sums["policy_rejected_logps"]
    ref_chosen, ref_rejected = sums["ref_chosen_logps"], sums["ref_rejected_logps"]
    n_chosen = vector.lengths(chosen_lengths, "chosen_lengths")
    n_rejected = vector.lengths(rejected_lengths, "rejected_lengths")
    aux_chosen, aux_rejected = vector.aux_rewards(aux_rewards_chosen, aux_rewards_rejected)
    extra_chosen, extra_rejected = vector.matrix_pair(
        extra_ref_chosen_logps, extra_ref_rejected_logps, ("extra_ref_chosen_logps", "extra_ref_rejected_logps"))
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
    per_pair_terms: dict[str, Tensor] = {}
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
            f_divergence_type=f_divergence_type,
            f_alpha_divergence_coef=f_alpha_divergence_coef,
            ld_alpha=ld_alpha,
            unweighted_chosen_logps=unweighted_chosen,
            extra_ref_chosen_logps=extra_chosen,
            extra_ref_rejected_logps=extra_rejected,
        )
        per_pair, term_metrics = spec.fn(ctx)
        if per_pair.shape != (batch,):
            raise RuntimeError(f"loss {name!r} returned shape {tuple(per_pair.shape)}, expected ({batch},)")
        if pair_weights is not None:
            per_pair = per_pair * pair_weights
        per_pair_terms[name] = per_pair
        terms[name] = per_pair.mean()
        losses = losses + weight * per_pair
        extras.update(term_metrics)

    mean = losses.mean()
    check_finite_loss(mean, losses, per_pair_terms, {
        "policy_chosen_logps": chosen_logps, "policy_rejected_logps": rejected_logps, "ref_chosen_logps": ref_chosen,
        "ref_rejected_logps": ref_rejected, "chosen_lengths": n_chosen, "rejected_lengths": n_rejected,
        "aux_rewards_chosen": aux_chosen, "aux_rewards_rejected": aux_rejected, "values_chosen": v_chosen,
        "values_rejected": v_rejected, "extra_ref_chosen_logps": extra_chosen,
        "extra_ref_rejected_logps": extra_rejected})
    metrics = reward_metrics(chosen_logps, rejected_logps, ref_chosen, ref_rejected, n_chosen, n_rejected, beta)
    metrics.update({key: to_float(value) for key, value in extras.items()})
    return LossOutput(loss=mean, losses=losses, terms=terms, metrics=metrics)
