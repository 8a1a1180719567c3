"""Analysis of a policy on held-out pairs: log-probs of policy and reference, and whether the policy's
implicit reward tracks the designer's reward."""
from __future__ import annotations

import torch
from torch import nn

from upo.train.data import PreferenceExample
from upo.train.reference import compute_sequence_logps


@torch.no_grad()
def policy_and_reference_logps(module: nn.Module, examples: list[PreferenceExample], ref_logps: dict | None,
                               *args) -> dict[str, dict]:
    """``{"policy": ..., "reference": ...}`` sums (and token counts) of the examples' responses.

    ``module`` is the bare :class:`~upo.train.preference_model.PreferenceModel` (never the DDP/FSDP
    wrapper); ``args`` are those of :func:`compute_sequence_logps` after ``examples``.
    """
    policy = compute_sequence_logps(module.policy, examples, *args)
    reference = module.reference
    if reference == "precomputed":
        ref = {side: ref_logps[side] for side in ("chosen", "rejected")}
    elif reference == "adapters":
        with module.policy.disable_adapter():
            ref = compute_sequence_logps(module.policy, examples, *args)
    elif reference is not None:
        ref = compute_sequence_logps(reference, examples, *args)
    else:
        ref = {side: torch.zeros_like(policy[side]) for side in ("chosen", "rejected")}
    return {"policy": policy, "reference": ref}


def implicit_reward_correlation(examples: list[PreferenceExample], logps: dict[str, dict],
                                reward_weights: list[float]) -> float | None:
    """Pearson correlation, over both responses of each example, between the per-token implicit reward
    ``(S - R) / n`` and the combined auxiliary reward ``sum_k w_k a_k`` (None when undefined)."""
    policy, reference = logps["policy"], logps["reference"]
    weights = torch.tensor(reward_weights)
    implicit, aux = [], []
    for example in examples:
        i = example.index
        for side in ("chosen", "rejected"):
            tokens = max(float(policy[f"{side}_tokens"][i]), 1.0)
            implicit.append(float(policy[side][i] - reference[side][i]) / tokens)
            aux.append(float(torch.tensor(getattr(example, f"aux_{side}")) @ weights))
    values = torch.tensor([implicit, aux], dtype=torch.float64)
    if len(implicit) < 4 or bool((values.std(dim=1) == 0).any()):
        return None  # undefined or meaningless (e.g. while policy == reference)
    return float(torch.corrcoef(values)[0, 1])
