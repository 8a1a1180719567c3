"""An exact bandit for UPO: a tabular softmax policy over K candidate responses per prompt.

What is known in closed form here is written without upo (so that the library is what is tested):

- the data: every ordered pair ``(i, j)`` of a prompt's candidates, chosen ``i`` over rejected ``j``
  with the probability of a Bradley-Terry model on a true utility ``u`` (``sig(u_i - u_j)``): the
  population of preference pairs, each row weighted by its probability, so that the loss is the
  expected loss and its optimum is exact; for KTO the same pairs unpaired (winner desirable, loser
  undesirable), as TRL unpairs a paired set;
- DPO's optimum on this population: ``pi*(k) ~ pi_ref(k) exp(u_k / beta)``;
- the expectile of a prompt's designer rewards (the value head's target), by bisection.

The policy is ``log_softmax(theta)`` (``S``, a candidate's summed log-prob; ``n`` its length in
tokens, which only ``aux_normalize="mean"`` reads), the reference ``log_softmax(theta_ref)``.
``upo.loss`` / ``upo.unpaired_loss`` give per-row losses; their weighted sum is minimised by
L-BFGS in float64 to convergence (the objective's float64 resolution places the optimum to about
1e-7 in probabilities and values). The detached quantities of a loss (KTO's reference point) are
found by a fixed-point iteration around it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

F64 = torch.float64


@dataclass
class Bandit:
    ref_logits: torch.Tensor  # [P, K]
    utility: torch.Tensor  # [P, K] true preference utility u (Bradley-Terry)
    aux: torch.Tensor  # [P, K] designer reward a
    lengths: torch.Tensor  # [P, K] tokens per candidate

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.ref_logits.shape)


def make_bandit(prompts: int = 4, candidates: int = 8, seed: int = 0, length: int | tuple[int, ...] = 1,
                correlation: float = 0.0) -> Bandit:
    """Utilities and designer rewards ~ N(0, 1) per candidate with the given correlation; lengths all
    ``length`` or drawn from the tuple; the reference a random softmax (logits ~ N(0, 0.5^2))."""
    g = torch.Generator().manual_seed(seed)
    shape = (prompts, candidates)
    utility = torch.randn(shape, generator=g, dtype=F64)
    noise = torch.randn(shape, generator=g, dtype=F64)
    aux = correlation * utility + math.sqrt(1 - correlation**2) * noise
    ref_logits = 0.5 * torch.randn(shape, generator=g, dtype=F64)
    if isinstance(length, int):
        lengths = torch.full(shape, float(length), dtype=F64)
    else:
        choices = torch.tensor(length, dtype=F64)
        lengths = choices[torch.randint(len(length), shape, generator=g)]
    return Bandit(ref_logits, utility, aux, lengths)


# ------------------------------------------------------------------ the data
@dataclass
class Rows:
    prompt: torch.Tensor  # [M] prompt of the row
    first: torch.Tensor  # [M] chosen (paired) or the completion (unpaired)
    second: torch.Tensor | None  # [M] rejected (paired only)
    desirable: torch.Tensor | None  # [M] bool (unpaired only)
    weight: torch.Tensor  # [M] probability of the row; sums to 1


def paired_rows(b: Bandit) -> Rows:
    """Every ordered pair (i, j), i != j, of every prompt, weighted by P(i preferred to j) / (P * K(K-1)/2)."""
    prompts, k = b.shape
    p, i, j = torch.meshgrid(torch.arange(prompts), torch.arange(k), torch.arange(k), indexing="ij")
    keep = i != j
    p, i, j = p[keep], i[keep], j[keep]
    win = torch.sigmoid(b.utility[p, i] - b.utility[p, j])
    weight = win / (prompts * k * (k - 1) / 2)
    return Rows(p, i, j, None, weight)


def unpaired_rows(b: Bandit) -> Rows:
    """The pairs unpaired: each candidate once desirable (weight: how often it wins) and once undesirable."""
    pairs = paired_rows(b)
    prompts, k = b.shape
    wins = torch.zeros(prompts, k, dtype=F64)
    desirable = wins.index_put((pairs.prompt, pairs.first), pairs.weight, accumulate=True)
    undesirable = wins.index_put((pairs.prompt, pairs.second), pairs.weight, accumulate=True)
    p, c = torch.meshgrid(torch.arange(prompts), torch.arange(k), indexing="ij")
    p, c = p.reshape(-1), c.reshape(-1)
    label = torch.cat([torch.ones(len(p), dtype=torch.bool), torch.zeros(len(p), dtype=torch.bool)])
    weight = torch.cat([desirable.reshape(-1), undesirable.reshape(-1)]) / 2  # each pair gives two rows
    return Rows(torch.cat([p, p]), torch.cat([c, c]), None, label, weight)


# ------------------------------------------------------------------ closed forms
def dpo_optimum(b: Bandit, beta: float) -> torch.Tensor:
    """DPO's exact optimum on the Bradley-Terry population: log pi = log_softmax(theta_ref + u / beta)."""
    return torch.log_softmax(b.ref_logits + b.utility / beta, dim=-1)


def expectile(values: torch.Tensor, tau: float) -> float:
    """The tau-expectile of equally weighted values: the root of sum |tau - 1[v < e]| (v - e) = 0."""
    low, high = float(values.min()), float(values.max())
    for _ in range(200):
        mid = (low + high) / 2
        residual = values - mid
        slope = torch.where(residual < 0, 1 - tau, tau) * residual
        low, high = (mid, high) if float(slope.sum()) > 0 else (low, mid)
    return (low + high) / 2


# ------------------------------------------------------------------ solving
def _minimise(parameter: torch.Tensor, objective, max_iter: int = 2000) -> torch.Tensor:
    optimizer = torch.optim.LBFGS([parameter], lr=1.0, max_iter=max_iter, tolerance_grad=1e-13,
                                  tolerance_change=1e-16, history_size=50, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        value = objective(parameter)
        value.backward()
        return value

    optimizer.step(closure)
    return parameter.detach()


def _paired_losses(upo, b: Bandit, rows: Rows, logp: torch.Tensor, loss_type, values=None, **options):
    ref = torch.log_softmax(b.ref_logits, dim=-1)
    p, c, r = rows.prompt, rows.first, rows.second
    aux = {}
    if "upo" in loss_type:
        aux = dict(aux_rewards_chosen=b.aux[p, c], aux_rewards_rejected=b.aux[p, r])
        if values is not None:
            aux["values_chosen"] = values[p]
    return upo.loss(logp[p, c], logp[p, r], ref[p, c], ref[p, r], loss_type=loss_type,
                    chosen_lengths=b.lengths[p, c], rejected_lengths=b.lengths[p, r], **aux, **options)


def _unpaired_losses(upo, b: Bandit, rows: Rows, logp: torch.Tensor, loss_type, values=None, **options):
    ref = torch.log_softmax(b.ref_logits, dim=-1)
    p, c = rows.prompt, rows.first
    aux = {}
    if "upo" in loss_type:
        aux = dict(aux_rewards=b.aux[p, c], values=None if values is None else values[p])
    return upo.unpaired_loss(logp[p, c], ref[p, c], rows.desirable, lengths=b.lengths[p, c], loss_type=loss_type,
                             **aux, **options)


def learn_values(upo, b: Bandit, paired: bool, expectile_tau: float) -> torch.Tensor:
    """V(x) per prompt trained by the library's value loss alone (upo_lambda = 0, the policy frozen)."""
    rows = paired_rows(b) if paired else unpaired_rows(b)
    logp = torch.log_softmax(b.ref_logits, dim=-1)
    losses = _paired_losses if paired else _unpaired_losses

    def objective(values):
        out = losses(upo, b, rows, logp, ["upo"], values=values, upo_lambda=0.0, expectile=expectile_tau)
        return (rows.weight * out.losses).sum()

    return _minimise(torch.zeros(b.shape[0], dtype=F64, requires_grad=True), objective)


def kto_kl_pairs(b: Bandit, logp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mismatched pairs: every candidate of prompt p scored under prompt p + 1 (prompts rotated by one)."""
    ref = torch.log_softmax(b.ref_logits, dim=-1)
    shifted = torch.roll(torch.arange(b.shape[0]), 1)
    return logp[shifted].reshape(-1), ref[shifted].reshape(-1)


def solve(upo, b: Bandit, loss_type, *, paired: bool = True, values=None, outer: int = 30, **options) -> dict:
    """The policy minimising the expected loss: ``{"logp": [P, K], "kl": KTO's reference point or None,
    "grad_norm": the final gradient norm}``. KTO's reference point is iterated to its fixed point."""
    loss_type = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    rows = paired_rows(b) if paired else unpaired_rows(b)
    losses = _paired_losses if paired else _unpaired_losses
    theta = b.ref_logits.clone()
    kl = None
    for _ in range(outer if "kto" in loss_type else 1):
        if "kto" in loss_type:
            kl_policy, kl_ref = kto_kl_pairs(b, torch.log_softmax(theta, dim=-1))
            new_kl = float(upo.kto_reference_point(kl_policy, kl_ref))
            if kl is not None and abs(new_kl - kl) < 1e-12:
                break
            kl = new_kl
            options["kl"] = kl

        def objective(logits):
            out = losses(upo, b, rows, torch.log_softmax(logits, dim=-1), loss_type, values=values, **options)
            return (rows.weight * out.losses).sum()

        theta = _minimise(theta.clone().requires_grad_(True), objective)
    check = theta.clone().requires_grad_(True)
    objective(check).backward()
    return {"logp": torch.log_softmax(theta, dim=-1), "kl": kl, "grad_norm": float(check.grad.norm())}


# ------------------------------------------------------------------ what a policy achieves
def measures(b: Bandit, logp: torch.Tensor) -> dict[str, float]:
    """Expected designer reward, expected utility, preference accuracy (share of a prompt's candidate pairs
    whose implicit reward log pi - log pi_ref orders them as the utility does) and expected length."""
    probs = logp.exp()
    ref = torch.log_softmax(b.ref_logits, dim=-1)
    implicit = logp - ref
    i, j = torch.triu_indices(b.shape[1], b.shape[1], offset=1)
    agree = (implicit[:, i] - implicit[:, j]) * (b.utility[:, i] - b.utility[:, j]) > 0
    return {
        "aux": float((probs * b.aux).sum(-1).mean()),
        "utility": float((probs * b.utility).sum(-1).mean()),
        "accuracy": float(agree.to(F64).mean()),
        "length": float((probs * b.lengths).sum(-1).mean()),
    }
