"""What ``upo-frontier`` measures of a trained run on the held-out pairs (docs/frontier.md defines each).

* ``preference_accuracy``: the share of held-out pairs whose implicit reward ranks the user's
  chosen response strictly above the rejected one, ``h = (S_c - R_c) - (S_r - R_r) > 0`` (what
  ``rewards/accuracies`` counts; ``beta > 0`` does not change the sign).
* ``aux_reward_preferred``: the mean over held-out pairs of the designer reward ``r_aux`` of the
  response with the higher implicit reward (the mean of the two on a tie, ``h = 0``).
* ``kl``: the mean over the ``2N`` held-out responses of the per-token log-ratio ``(S - R) / n``.
  It is measured on the dataset's fixed responses, not on samples of the policy, so it is an
  estimate of the drift from the reference, not the KL of the policy's own outputs (it can be < 0).

What the policy writes (``--generate N``) is measured in generated.py.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class HeldOut:
    """The held-out pairs as the frontier scores them: plain texts, the rows, designer rewards per side."""

    prompts: list[str]
    aux_chosen: list[float]
    aux_rejected: list[float]

    @property
    def agreeing(self) -> list[bool]:
        """Pairs where the designer reward does not disagree with the label (``r_c >= r_r``)."""
        return [c >= r for c, r in zip(self.aux_chosen, self.aux_rejected)]


def pair_metrics(logps: dict, indices: list[int], held_out: HeldOut) -> dict[str, float]:
    """Accuracy, designer reward of the preferred response, KL estimate (and their parts) over these pairs.

    ``logps`` is ``Trainer.sequence_logps(indices)``; ``indices[j]`` is held-out pair ``j``.
    """
    policy, reference = logps["policy"], logps["reference"]
    idx = torch.tensor(indices)
    ratio = {side: (policy[side][idx] - reference[side][idx]).double() for side in ("chosen", "rejected")}
    per_token = {side: ratio[side] / policy[f"{side}_tokens"][idx].double().clamp_min(1.0) for side in ratio}
    aux = (torch.tensor(held_out.aux_chosen, dtype=torch.float64), torch.tensor(held_out.aux_rejected,
                                                                                 dtype=torch.float64))
    correct, preferred = ranking(ratio["chosen"] - ratio["rejected"], *aux)
    # Diagnostic only (not plotted): the same ranking by the per-token log-ratio, which no length favours.
    correct_per_token, preferred_per_token = ranking(per_token["chosen"] - per_token["rejected"], *aux)
    agreeing = torch.tensor(held_out.agreeing)
    return {
        "preference_accuracy": float(correct.mean()),
        "aux_reward_preferred": float(preferred.mean()),
        "kl": float(torch.cat([per_token["chosen"], per_token["rejected"]]).mean()),
        "preference_accuracy_agreeing": _mean_or_none(correct[agreeing]),
        "preference_accuracy_disagreeing": _mean_or_none(correct[~agreeing]),
        "logratio_chosen": float(per_token["chosen"].mean()),
        "logratio_rejected": float(per_token["rejected"].mean()),
        "preference_accuracy_per_token": float(correct_per_token.mean()),
        "aux_reward_preferred_per_token": float(preferred_per_token.mean()),
    }


def ranking(margin: torch.Tensor, aux_chosen: torch.Tensor, aux_rejected: torch.Tensor):
    """Per pair: whether the chosen response ranks strictly first (1.0 or 0.0), and the designer reward of
    the response that ranks first (the mean of the two on a tie)."""
    tie = (aux_chosen + aux_rejected) / 2
    preferred = torch.where(margin > 0, aux_chosen, torch.where(margin < 0, aux_rejected, tie))
    return (margin > 0).double(), preferred


def _mean_or_none(values: torch.Tensor) -> float | None:
    return float(values.mean()) if values.numel() else None


@dataclass(frozen=True)
class GenerateSettings:
    prompts: int
    max_tokens: int
    temperature: float
    seed: int
    batch_size: int = 8
    samples: int = 1  # completions per prompt
    greedy_prompts: int = 0  # also greedy completions of the first of the prompts: a diagnostic


def attainable_frontier(held_out: HeldOut, points: int = 11) -> list[dict]:
    """The best trade-off any ranking of these held-out pairs can reach: starting from "prefer every
    chosen response", give the designer's side the disagreeing pairs with the largest reward gap first.

    Each point is ``{"preference_accuracy", "aux_reward_preferred"}``; ``points`` of them evenly spaced
    in the number of pairs given up (both ends included).
    """
    n = len(held_out.aux_chosen)
    gains = sorted((r - c for c, r in zip(held_out.aux_chosen, held_out.aux_rejected) if c < r), reverse=True)
    base = sum(held_out.aux_chosen)
    steps = sorted({round(k * len(gains) / max(points - 1, 1)) for k in range(points)}) if gains else [0]
    return [{"preference_accuracy": (n - k) / n, "aux_reward_preferred": (base + sum(gains[:k])) / n}
            for k in steps]
