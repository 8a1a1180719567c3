"""Analysis of a policy on held-out pairs: log-probs of policy and reference, whether the policy's
implicit reward tracks the designer's reward, and the progress bar of an evaluation."""
from __future__ import annotations

import sys

import torch
from torch import nn

from upo.train.data import PreferenceExample, eval_chunks
from upo.train.metrics import MetricMean, reward_metrics, scalar_metrics
from upo.train.reference import compute_sequence_logps


@torch.no_grad()
def evaluate_pairs(trainer, indices: list[int]) -> dict[str, float]:
    """Pair-weighted mean metrics of ``trainer``'s model over these examples, with a progress bar;
    with aux rewards also the implicit-reward correlation (not under FSDP: it runs the bare module)."""
    if not indices:
        return {}
    config, runtime = trainer.config, trainer.runtime
    with_correlation = trainer.reward is not None and not (config.fsdp and runtime.distributed)
    means, implicit, aux = MetricMean(), [], []
    progress = EvalProgress(len(indices), config.progress and runtime.is_main)
    trainer.model.eval()
    try:
        for chunk in eval_chunks(indices, config.batch_size, trainer.mismatched):
            batch = trainer.make_batch(chunk)
            values = {**scalar_metrics(trainer.model(batch)), **reward_metrics(batch, trainer.data.reward_names)}
            means.add(values, batch.num_examples)
            if with_correlation:
                x, y = implicit_and_aux_rewards([trainer.data.examples[i] for i in chunk],
                                                trainer.sequence_logps(chunk), trainer.reward.weights)
                implicit, aux = implicit + x, aux + y
            progress.update(len(chunk))
    finally:
        progress.close()
        trainer.model.train()
    results = means.means()
    correlation = pearson(implicit, aux) if with_correlation else None
    if correlation is not None:
        results["aux/implicit_reward_corr"] = correlation
    return results


@torch.no_grad()
def policy_and_reference_logps(module: nn.Module, examples: list[PreferenceExample], ref_logps: dict | None,
                               *args) -> dict[str, dict]:
    """``{"policy": ..., "reference": ...}`` sums (and token counts) of the examples' responses.

    ``module`` is the bare :class:`~upo.train.preference_model.PreferenceModel` (never the DDP/FSDP
    wrapper); ``args`` are those of :func:`compute_sequence_logps` after ``examples``.
    """
    policy = compute_sequence_logps(module.policy, examples, *args)
    reference = module.reference
    sides = list(examples[0].responses) if examples else []
    if reference == "precomputed":
        ref = {side: ref_logps[side] for side in sides}
    elif reference == "adapters":
        with module.policy.disable_adapter():
            ref = compute_sequence_logps(module.policy, examples, *args)
    elif reference is not None:
        ref = compute_sequence_logps(reference, examples, *args)
    else:
        ref = {side: torch.zeros_like(policy[side]) for side in sides}
    return {"policy": policy, "reference": ref}


def implicit_and_aux_rewards(examples: list[PreferenceExample], logps: dict[str, dict],
                             reward_weights: list[float]) -> tuple[list[float], list[float]]:
    """For every response of each example (both of a pair, an unpaired row's one): the per-token implicit
    reward ``(S - R) / n`` and the combined auxiliary reward ``sum_k w_k a_k``."""
    policy, reference = logps["policy"], logps["reference"]
    weights = torch.tensor(reward_weights)
    implicit, aux = [], []
    for example in examples:
        i = example.index
        for side in example.responses:
            tokens = max(float(policy[f"{side}_tokens"][i]), 1.0)
            implicit.append(float(policy[side][i] - reference[side][i]) / tokens)
            scores = example.aux if side == "completion" else getattr(example, f"aux_{side}")
            aux.append(float(torch.tensor(scores) @ weights))
    return implicit, aux


def pearson(implicit: list[float], aux: list[float]) -> float | None:
    """Pearson correlation of the two lists (None when undefined or meaningless)."""
    values = torch.tensor([implicit, aux], dtype=torch.float64)
    if len(implicit) < 4 or bool((values.std(dim=1) == 0).any()):
        return None  # undefined or meaningless (e.g. while policy == reference)
    return float(torch.corrcoef(values)[0, 1])


class EvalProgress:
    """A transient progress bar over the held-out pairs (a long final evaluation is not silent)."""

    def __init__(self, total: int, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc="eval", unit="pair", leave=False, dynamic_ncols=True,
                            mininterval=0.5, file=sys.stderr)

    def update(self, pairs: int) -> None:
        if self.bar is not None:
            self.bar.update(pairs)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
