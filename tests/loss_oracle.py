"""Float64 reference formulas for ``upo.losses``, written independently of the library.

Each oracle takes a batch dict of float64 tensors (``S_c, S_r, R_c, R_r, n_c, n_r, a_c,
a_r, v_c, v_r``; ``a_*`` are [B, K]) plus ``beta``, ``eps`` and the loss's options, and
returns the per-pair loss [B]. They follow docs/losses.md and TRL's trainers line by
line, using only elementary functions, so that a slip in the library shows up as a
mismatch rather than being copied.
"""
from __future__ import annotations

import math

import torch

F64 = torch.float64


# ---------------------------------------------------------------- elementary pieces
def sigmoid(x):
    return 1.0 / (1.0 + torch.exp(-x))


def log_sigmoid(x):
    # log(1 / (1 + e^-x)); inputs in the tests stay far from float64 overflow.
    return -torch.log1p(torch.exp(-x))


def log_ratios(b):
    return b["S_c"] - b["R_c"], b["S_r"] - b["R_r"]


# ---------------------------------------------------------------- DPO family
def sigmoid_loss(b, beta, eps):
    rc, rr = log_ratios(b)
    x = beta * (rc - rr)
    return -(1 - eps) * log_sigmoid(x) - eps * log_sigmoid(-x)


def robust_loss(b, beta, eps):
    rc, rr = log_ratios(b)
    x = beta * (rc - rr)
    return (-(1 - eps) * log_sigmoid(x) + eps * log_sigmoid(-x)) / (1 - 2 * eps)


def hinge_loss(b, beta, eps):
    rc, rr = log_ratios(b)
    return torch.clamp(1 - beta * (rc - rr), min=0)


def ipo_loss(b, beta, eps):
    rc, rr = log_ratios(b)
    h_avg = rc / b["n_c"] - rr / b["n_r"]
    return (h_avg - 1 / (2 * beta)) ** 2


def exo_pair_loss(b, beta, eps):
    eps = eps if eps > 0 else 1e-3
    rc, rr = log_ratios(b)
    x = beta * (rc - rr)
    p_w, p_l = sigmoid(x), sigmoid(-x)
    return p_w * (torch.log(p_w) - math.log(1 - eps)) + p_l * (torch.log(p_l) - math.log(eps))


def nca_pair_loss(b, beta, eps):
    rc, rr = log_ratios(b)
    return -log_sigmoid(beta * rc) - 0.5 * log_sigmoid(-beta * rc) - 0.5 * log_sigmoid(-beta * rr)


def bco_pair_loss(b, beta, eps, bco_delta=None):
    rc, rr = log_ratios(b)
    if bco_delta is None:
        bco_delta = ((beta * rc).sum() + (beta * rr).sum()).detach() / (2 * len(rc))
    return -log_sigmoid(beta * rc - bco_delta) - log_sigmoid(-(beta * rr - bco_delta))


def sppo_hard_loss(b, beta, eps):
    rc, rr = log_ratios(b)
    return (rc - 0.5 / beta) ** 2 + (rr + 0.5 / beta) ** 2


def apo_zero_loss(b, beta, eps):
    rc, rr = log_ratios(b)
    return (1 - sigmoid(beta * rc)) + sigmoid(beta * rr)


def apo_down_loss(b, beta, eps):
    rc, rr = log_ratios(b)
    return sigmoid(beta * rc) + (1 - sigmoid(beta * (rc - rr)))


def discopop_loss(b, beta, eps, discopop_tau=0.05):
    rc, rr = log_ratios(b)
    x = beta * (rc - rr)
    m = sigmoid(x / discopop_tau)
    return -log_sigmoid(x) * (1 - m) + torch.exp(-x) * m


# ---------------------------------------------------------------- reference-free
def simpo_loss(b, beta, eps, gamma=None, gamma_beta_ratio=None):
    if gamma is None:
        gamma = 0.5 if gamma_beta_ratio is None else gamma_beta_ratio * beta
    # TRL CPO: logits = (Sbar_c - Sbar_r) - gamma / beta, loss on beta * logits.
    x = beta * ((b["S_c"] / b["n_c"] - b["S_r"] / b["n_r"]) - gamma / beta)
    return -(1 - eps) * log_sigmoid(x) - eps * log_sigmoid(-x)


def orpo_loss(b, beta, eps, orpo_lambda=None):
    lam = beta if orpo_lambda is None else orpo_lambda
    mc, mr = b["S_c"] / b["n_c"], b["S_r"] / b["n_r"]
    log_odds_c = mc - torch.log(1 - torch.exp(mc))
    log_odds_r = mr - torch.log(1 - torch.exp(mr))
    return -mc - lam * log_sigmoid(log_odds_c - log_odds_r)


def nll_loss(b, beta, eps, alpha=1.0):
    return alpha * (-b["S_c"] / b["n_c"])


def kto_loss(b, beta, eps, desirable_weight=1.0, undesirable_weight=1.0, kl=None):
    rc, rr = log_ratios(b)
    if kl is None:
        kl = torch.clamp(torch.cat([rc, rr]).mean().detach(), min=0)
    per_example = torch.cat(
        [desirable_weight * (1 - sigmoid(beta * (rc - kl))), undesirable_weight * (1 - sigmoid(beta * (kl - rr)))]
    )
    # Pair i holds examples i and B + i; the batch mean equals the mean over 2B examples.
    batch = len(rc)
    return (per_example[:batch] + per_example[batch:]) / 2


# ---------------------------------------------------------------- UPO
def upo_parts(
    b,
    beta,
    eps,
    upo_lambda=1.0,
    beta_aux=1.0,
    omega_max=20.0,
    expectile=0.7,
    aux_weights=None,
    baseline=None,
    aux_normalize="mean",
    use_values=True,
):
    """Per-response quantities of the UPO term over the 2B responses [chosen..., rejected...]."""
    a = torch.cat([b["a_c"], b["a_r"]])  # [2B, K]
    w = torch.ones(a.shape[1], dtype=F64) if aux_weights is None else torch.tensor(aux_weights, dtype=F64)
    r = (a * w).sum(dim=1)
    batch = len(b["S_c"])
    has_values = use_values and b.get("v_c") is not None
    v = torch.cat([b["v_c"], b.get("v_r", b["v_c"])]) if has_values else None
    baseline = baseline or ("value" if has_values else "pair_mean")
    if baseline == "value":
        base = v.detach()
    elif baseline == "pair_mean":
        pair = (r[:batch] + r[batch:]) / 2
        base = torch.cat([pair, pair])
    else:
        base = torch.full_like(r, r.mean().item())
    advantage = r - base
    omega = torch.minimum(torch.exp(advantage / beta_aux), torch.tensor(omega_max, dtype=F64)).detach()
    s = torch.cat([b["S_c"], b["S_r"]])
    x = s / torch.cat([b["n_c"], b["n_r"]]) if aux_normalize == "mean" else s
    aux = -omega * x  # per response; mean over 2B is L_aux
    if has_values:
        u = r - v
        value = torch.where(u < 0, torch.full_like(u, 1 - expectile), torch.full_like(u, expectile)) * u**2
    else:
        value = torch.zeros_like(r)
    return {"reward": r, "advantage": advantage, "omega": omega, "aux": aux, "value": value, "lambda": upo_lambda}


def upo_loss(b, beta, eps, **options):
    parts = upo_parts(b, beta, eps, **options)
    per_response = parts["lambda"] * parts["aux"] + parts["value"]
    batch = len(b["S_c"])
    return (per_response[:batch] + per_response[batch:]) / 2


ORACLES = {
    "sigmoid": sigmoid_loss,
    "robust": robust_loss,
    "hinge": hinge_loss,
    "ipo": ipo_loss,
    "exo_pair": exo_pair_loss,
    "nca_pair": nca_pair_loss,
    "bco_pair": bco_pair_loss,
    "sppo_hard": sppo_hard_loss,
    "apo_zero": apo_zero_loss,
    "apo_down": apo_down_loss,
    "discopop": discopop_loss,
    "simpo": simpo_loss,
    "orpo": orpo_loss,
    "nll": nll_loss,
    "rpo": nll_loss,
    "kto": kto_loss,
    "upo": upo_loss,
}

REFERENCE_FREE = {"simpo", "orpo", "nll", "rpo", "upo"}


# ---------------------------------------------------------------- inputs
def random_batch(generator: torch.Generator, batch: int = 6, columns: int = 2, dtype=torch.float32):
    """Plausible per-sequence inputs: log-probs < 0, log-ratios of a few nats, n in [1, 40]."""

    def uniform(low, high, *shape):
        return low + (high - low) * torch.rand(*shape, generator=generator, dtype=F64)

    def normal(scale, *shape):
        return scale * torch.randn(*shape, generator=generator, dtype=F64)

    s_c, s_r = uniform(-60, -1, batch), uniform(-60, -1, batch)
    values = {
        "S_c": s_c,
        "S_r": s_r,
        "R_c": s_c + normal(3, batch),
        "R_r": s_r + normal(3, batch),
        "n_c": torch.randint(1, 41, (batch,), generator=generator).to(F64),
        "n_r": torch.randint(1, 41, (batch,), generator=generator).to(F64),
        "a_c": normal(1, batch, columns),
        "a_r": normal(1, batch, columns),
        "v_c": normal(1, batch),
    }
    return {key: value.to(dtype) for key, value in values.items()}


def as_float64(batch):
    """Float64 leaves with gradients, holding exactly the values of ``batch``."""
    return {key: value.detach().to(F64).requires_grad_(key in ("S_c", "S_r", "v_c")) for key, value in batch.items()}
