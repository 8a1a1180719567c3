"""TRL's reward and log-prob metrics of a batch (``rewards/*``, ``logps/*``)."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def to_float(value: Any) -> float:
    return float(value.detach().item()) if isinstance(value, Tensor) else float(value)


@torch.no_grad()
def reward_metrics(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen: Tensor | None,
    ref_rejected: Tensor | None,
    n_chosen: Tensor | None,
    n_rejected: Tensor | None,
    beta: float,
) -> dict[str, float]:
    """Implicit rewards beta*(S - R), or beta*Sbar / beta*S without a reference (TRL's CPO/ORPO)."""
    if ref_chosen is not None and ref_rejected is not None:
        chosen_scores, rejected_scores = chosen_logps - ref_chosen, rejected_logps - ref_rejected
    elif n_chosen is not None and n_rejected is not None:
        chosen_scores, rejected_scores = chosen_logps / n_chosen, rejected_logps / n_rejected
    else:
        chosen_scores, rejected_scores = chosen_logps, rejected_logps
    chosen_rewards, rejected_rewards = beta * chosen_scores, beta * rejected_scores
    return {
        "rewards/chosen": to_float(chosen_rewards.mean()),
        "rewards/rejected": to_float(rejected_rewards.mean()),
        "rewards/margins": to_float((chosen_rewards - rejected_rewards).mean()),
        "rewards/accuracies": to_float((chosen_rewards > rejected_rewards).to(chosen_rewards.dtype).mean()),
        "logps/chosen": to_float(chosen_logps.mean()),
        "logps/rejected": to_float(rejected_logps.mean()),
    }


@torch.no_grad()
def unpaired_reward_metrics(logps: Tensor, ref_logps: Tensor | None, lengths: Tensor | None, desirable: Tensor,
                            beta: float) -> dict[str, float]:
    """TRL's ``KTOTrainer`` metrics: ``rewards/*`` and ``logps/*`` of the desirable ("chosen") and undesirable
    ("rejected") rows; a class absent from the batch is left out, and so is ``rewards/margins`` then."""
    if ref_logps is not None:
        scores = logps - ref_logps
    elif lengths is not None:
        scores = logps / lengths
    else:
        scores = logps
    rewards = beta * scores
    metrics: dict[str, float] = {}
    for side, rows in (("chosen", desirable), ("rejected", ~desirable)):
        if bool(rows.any()):
            metrics[f"rewards/{side}"] = to_float(rewards[rows].mean())
            metrics[f"logps/{side}"] = to_float(logps[rows].mean())
    if "rewards/chosen" in metrics and "rewards/rejected" in metrics:
        metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return metrics
