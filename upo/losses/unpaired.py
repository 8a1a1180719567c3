"""``upo.unpaired_loss``: the losses that read single completions (``kto``, ``upo``) over ``N`` unpaired rows.

KTO's data format (TRL's ``prompt`` / ``completion`` / ``label``): each row is one completion of
its prompt with a label, desirable or not; nothing pairs the rows. The losses are the paired
path's, computed per response by the same functions (``kto.py``, ``upo.py``); inputs are checked by
the same checkers. Formulas: docs/losses.md ("Unpaired data").
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from upo.losses.api import LossOutput
from upo.losses.inputs import (VectorChecker, batch_size, check_finite_loss, check_hyperparameters, check_options,
                               compute_dtype, resolve_loss_types)
from upo.losses.metrics import to_float, unpaired_reward_metrics
from upo.losses.registry import LossSpec, UnpairedContext, available_losses, loss_spec

__all__ = ["unpaired_loss", "unpaired_losses"]


def unpaired_losses() -> list[str]:
    """Sorted names (aliases included) that :func:`unpaired_loss` accepts."""
    return [name for name in available_losses() if loss_spec(name).unpaired_fn is not None]


def _check_unpaired(names: list[str], specs: list[LossSpec]) -> None:
    paired_only = [name for name, spec in zip(names, specs) if spec.unpaired_fn is None]
    if paired_only:
        raise ValueError(f"loss {paired_only[0]!r} compares the two responses of a pair and cannot read unpaired "
                         f"rows; on unpaired data use {', '.join(unpaired_losses())}")


def unpaired_loss(
    policy_logps: Tensor,
    ref_logps: Tensor | None = None,
    desirable: Tensor | Sequence[bool] | None = None,
    *,
    lengths: Tensor | None = None,
    loss_type: str | Sequence[str] = "kto",
    loss_weights: Sequence[float] | None = None,
    beta: float = 0.1,
    aux_rewards: Tensor | None = None,
    values: Tensor | None = None,
    **options: Any,
) -> LossOutput:
    """Weighted sum of the unpaired losses over ``N`` rows (``loss = mean_i sum_j w_j l_ij``, as TRL's KTO).

    - ``policy_logps`` ``[N]``: summed completion log-probs under the policy; ``ref_logps`` ``[N]``
      under the reference (``kto`` needs it); ``desirable`` ``[N]``: booleans (or 0/1), TRL's
      ``label``; ``lengths`` ``[N]``: completion tokens (``upo`` with ``aux_normalize="mean"``).
    - ``aux_rewards`` ``[N]`` or ``[N, K]`` and ``values`` ``[N]`` (V of each row's prompt, with its
      gradient): UPO's inputs; its baselines here are ``"value"`` and ``"batch_mean"``.
    - ``**options``: the losses' options, as :func:`upo.loss`. ``kto``'s reference point comes from
      ``kl_policy_logps`` and ``kl_ref_logps`` (``[M]``, the mismatched pairs:
      :func:`upo.kto_reference_point`, all-reduced when ``torch.distributed`` is initialised) or is
      given as ``kl``; one of them is required. ``desirable_weight``, ``undesirable_weight`` weigh
      the two classes (TRL's names and defaults).

    Returns :class:`upo.LossOutput` with ``losses`` ``[N]`` (per row) and TRL's ``KTOTrainer``
    metric names (``rewards/chosen`` for desirable rows, ``rewards/rejected``, ``rewards/margins``,
    ``logps/*``, ``kl``) plus UPO's. Raises ``ValueError`` naming the argument for bad input, and
    for a loss that needs pairs (``sigmoid``, ``ipo``, ...).
    """
    names, weights = resolve_loss_types(loss_type, loss_weights)
    specs = [loss_spec(name) for name in names]
    _check_unpaired(names, specs)
    check_options(options, names, specs)
    beta, _ = check_hyperparameters(beta, 0.0)

    dtype = compute_dtype(policy_logps, ref_logps)
    rows = batch_size(policy_logps, "policy_logps", rows="N", unit="row")
    device = policy_logps.device
    vector = VectorChecker(rows, dtype, device, first="policy_logps")
    logps = vector.logps(policy_logps, "policy_logps")
    ref = vector.reference_logps(ref_logps, "ref_logps")
    if desirable is None:
        raise ValueError("desirable is required: [N] booleans, True for a desirable completion (TRL's label)")
    labels = vector.flags(desirable, "desirable")
    n = vector.lengths(lengths, "lengths")
    aux = vector.matrix(aux_rewards, "aux_rewards")
    v = vector.values(values, "values")
    for name, spec in zip(names, specs):
        needed = [("ref_logps", ref, spec.needs_reference), ("lengths", n, spec.needs_lengths),
                  ("aux_rewards", aux, spec.needs_aux_rewards)]
        for argument, given, needs in needed:
            if needs and given is None:
                raise ValueError(f"{argument} is required by loss {name!r}")

    losses = torch.zeros(rows, dtype=dtype, device=device)
    terms: dict[str, Tensor] = {}
    per_row_terms: dict[str, Tensor] = {}
    extras: dict[str, Any] = {}
    for name, spec, weight in zip(names, specs, weights):
        ctx = UnpairedContext(name=name, logps=logps, ref_logps=ref, desirable=labels, lengths=n, aux_rewards=aux,
                              values=v, beta=beta,
                              options={key: options.get(key, default) for key, default in spec.options.items()})
        per_row, term_metrics = spec.unpaired_fn(ctx)
        if per_row.shape != (rows,):
            raise RuntimeError(f"loss {name!r} returned shape {tuple(per_row.shape)}, expected ({rows},)")
        per_row_terms[name] = per_row
        terms[name] = per_row.mean()
        losses = losses + weight * per_row
        extras.update(term_metrics)

    mean = losses.mean()
    check_finite_loss(mean, losses, per_row_terms, {"policy_logps": logps, "ref_logps": ref, "lengths": n,
                                                    "aux_rewards": aux, "values": v}, unit="row")
    metrics = unpaired_reward_metrics(logps, ref, n, labels, beta)
    metrics.update({key: to_float(value) for key, value in extras.items()})
    return LossOutput(loss=mean, losses=losses, terms=terms, metrics=metrics)
