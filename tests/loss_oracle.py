"""Float64 reference formulas for ``upo.losses``, written independently of the library.

Each oracle takes a batch dict of float64 tensors (``S_c, S_r, R_c, R_r, n_c, n_r, a_c,
a_r, v_c, v_r``; ``a_*`` are [B, K]; MRPO's extra references ``E_c, E_r`` [B, K]) plus
``beta``, ``eps`` and the loss's options, and returns the per-pair loss [B]. An optional
``b["f"] = (f_divergence_type, coef)`` selects the f-divergence scores; :func:`with_ld` and
:func:`with_wpo` apply LD-DPO and WPO. They follow docs/losses.md, TRL 1.16's
``DPOTrainer._compute_loss`` and the papers' released code line by line, using only
elementary functions, so that a slip in the library shows up as a mismatch rather than
being copied.
"""
from __future__ import annotations

import math

import torch

F64 = torch.float64


# ---------------------------------------------------------------- elementary pieces
def sigmoid(x):
    return torch.exp(log_sigmoid(x))


def log_sigmoid(x):
    # log(1 / (1 + e^-x)) = min(x, 0) - log(1 + e^-|x|): no overflow for the large |x| of forward_kl scores
    return torch.minimum(x, torch.zeros_like(x)) - torch.log1p(torch.exp(-x.abs()))


def log_ratios(b):
    return b["S_c"] - b["R_c"], b["S_r"] - b["R_r"]


def f_prime(u, kind, coef):
    """f'(t) at t = pi / pi_ref = exp(u), straight from the definitions (TRL 1.16's constants)."""
    t = torch.exp(u)
    if kind == "reverse_kl":  # f(t) = -log t up to the affine part: f'(t) -> log t
        return torch.log(t)
    if kind == "forward_kl":  # f(t) = t log t: f'(t) = 1 - 1/t in TRL's form
        return 1 - 1 / t
    if kind == "js_divergence":  # f'(t) = log(2t / (1 + t))
        return torch.log(2 * t / (1 + t))
    if kind == "alpha_divergence":
        if abs(coef - 1) < 1e-6:
            return u
        power = torch.minimum((coef - 1) * u, torch.full_like(u, 80.0))  # TRL's exponent cap
        return (torch.exp(power) - 1) / (coef - 1)
    raise AssertionError(kind)


def scores(b):
    kind, coef = b.get("f", ("reverse_kl", 0.5))
    rc, rr = log_ratios(b)
    return f_prime(rc, kind, coef), f_prime(rr, kind, coef)


def score_margin(b):
    sc, sr = scores(b)
    return sc - sr


# ---------------------------------------------------------------- DPO family
def sigmoid_loss(b, beta, eps):
    # TRL 1.16: no label smoothing in sigmoid
    return -log_sigmoid(beta * score_margin(b))


def cdpo_loss(b, beta, eps):
    x = beta * score_margin(b)
    return -(1 - eps) * log_sigmoid(x) - eps * log_sigmoid(-x)


def robust_loss(b, beta, eps):
    x = beta * score_margin(b)
    return (-(1 - eps) * log_sigmoid(x) + eps * log_sigmoid(-x)) / (1 - 2 * eps)


def hinge_loss(b, beta, eps):
    return torch.clamp(1 - beta * score_margin(b), min=0)


def ipo_loss(b, beta, eps):
    sc, sr = scores(b)
    h_avg = sc / b["n_c"] - sr / b["n_r"]
    return (h_avg - 1 / (2 * beta)) ** 2


def sigmoid_norm_loss(b, beta, eps):
    sc, sr = scores(b)
    return -log_sigmoid(beta * (sc / b["n_c"] - sr / b["n_r"]))


def exo_pair_loss(b, beta, eps):
    x = beta * score_margin(b)
    p_w, p_l = sigmoid(x), sigmoid(-x)
    # log p via log_sigmoid: p = 0 times a finite log is 0 (log(0) would make 0 * -inf)
    return p_w * (log_sigmoid(x) - math.log(1 - eps)) + p_l * (log_sigmoid(-x) - math.log(eps))


def nca_pair_loss(b, beta, eps):
    rc, rr = log_ratios(b)
    return -log_sigmoid(beta * rc) - 0.5 * log_sigmoid(-beta * rc) - 0.5 * log_sigmoid(-beta * rr)


def bco_pair_loss(b, beta, eps, bco_delta=0.0):
    rc, rr = log_ratios(b)
    if bco_delta == "batch_mean":
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
    x = beta * score_margin(b)
    m = sigmoid(x / discopop_tau)
    # m * exp(-x) = exp(log m - x): TRL's literal product is inf * 0 for x << 0 (forward_kl scores)
    return -log_sigmoid(x) * (1 - m) + torch.exp(log_sigmoid(x / discopop_tau) - x)


def _rank_logistic(beta, eps, z):
    return -log_sigmoid(beta * z) * (1 - eps) - log_sigmoid(-beta * z) * eps


def aot_loss(b, beta, eps):
    # entry i: the i-th smallest policy margin against the i-th smallest reference margin
    policy = sorted((b["S_c"] - b["S_r"]).unbind(0), key=lambda x: x.item())
    ref = sorted((b["R_c"] - b["R_r"]).unbind(0), key=lambda x: x.item())
    return _rank_logistic(beta, eps, torch.stack(policy) - torch.stack(ref))


def aot_unpaired_loss(b, beta, eps):
    rc, rr = log_ratios(b)
    chosen = sorted(rc.unbind(0), key=lambda x: x.item())
    rejected = sorted(rr.unbind(0), key=lambda x: x.item())
    return _rank_logistic(beta, eps, torch.stack(chosen) - torch.stack(rejected))


# ---------------------------------------------------------------- the seed's variants
def minor_dpo_loss(b, beta, eps):
    rc, rr = log_ratios(b)
    penalty = torch.where(rr > 0, rr, torch.zeros_like(rr))
    return -log_sigmoid(beta * (rc - penalty))


def alpha_dpo_loss(b, beta, eps, margin_alpha=0.2, gamma_beta_ratio=0.6, margin_mean=None, margin_std=None):
    """As the authors' AlphaDPOTrainer.dpo_loss ('alpha-dpo', ln=True), with batch statistics."""
    pi_logratios = b["S_c"] / b["n_c"] - b["S_r"] / b["n_r"]
    ref_logratios = b["R_c"] / b["n_c"] - b["R_r"] / b["n_r"]
    gap = (pi_logratios - ref_logratios).detach()
    count = len(gap)
    mean = gap.sum() / count if margin_mean is None else margin_mean
    std = torch.sqrt(((gap - gap.sum() / count) ** 2).sum() / (count - 1)) if margin_std is None else margin_std
    constant_term = ((gap - mean) / std * margin_alpha + gamma_beta_ratio).detach()
    logits = pi_logratios - constant_term
    return -log_sigmoid(beta * logits) * (1 - eps) - log_sigmoid(-beta * logits) * eps


def mrpo_loss(b, beta, eps, mrpo_weights=None, mrpo_eta=0.1, mrpo_eta_mode="adaptive"):
    """The authors' MRefDPOTrainer for one extra reference, and 1/pi~ = sum_k w_k / pi_k for more."""
    primary_c, primary_r = b["R_c"].detach(), b["R_r"].detach()
    extra_c, extra_r = b["E_c"].detach(), b["E_r"].detach()
    columns = extra_c.shape[1]
    if mrpo_eta_mode == "fixed":
        eta_c = eta_r = torch.full_like(primary_c, mrpo_eta)
    else:
        mean_c = (primary_c + extra_c.sum(1)) / (columns + 1)
        mean_r = (primary_r + extra_r.sum(1)) / (columns + 1)
        scale = mean_c.abs() / (mean_c.abs() + mean_r.abs())
        eta_c, eta_r = mrpo_eta * scale, mrpo_eta * (1 - scale)
    # clip (reference log-probs are < 0): max with (1 + eta) R_p, then min with (1 - eta) R_p
    clip_c = torch.min(torch.max(extra_c, (primary_c * (1 + eta_c))[:, None]), (primary_c * (1 - eta_c))[:, None])
    clip_r = torch.min(torch.max(extra_r, (primary_r * (1 + eta_r))[:, None]), (primary_r * (1 - eta_r))[:, None])
    if mrpo_weights is None:  # the authors' adaptive alpha, two references
        a_extra = (extra_c[:, 0] - extra_r[:, 0]).abs()
        a_primary = (primary_c - primary_r).abs()
        alpha = a_extra / (a_extra + a_primary + 1e-6)

        def combine(extra, primary):  # log-sum trick of the authors' code
            c = torch.max(extra, primary)
            log_mix = c + torch.log(alpha * torch.exp(extra - c) + (1 - alpha) * torch.exp(primary - c))
            return extra + primary - log_mix

        ref_c, ref_r = combine(clip_c[:, 0], primary_c), combine(clip_r[:, 0], primary_r)
    else:
        w = torch.as_tensor(mrpo_weights, dtype=F64)
        w = (w / w.sum(-1, keepdim=True)).expand(len(primary_c), -1)
        ref_c = -torch.log((w * torch.exp(-torch.cat([primary_c[:, None], clip_c], 1))).sum(1))
        ref_r = -torch.log((w * torch.exp(-torch.cat([primary_r[:, None], clip_r], 1))).sum(1))
    logits = (b["S_c"] - ref_c) - (b["S_r"] - ref_r)
    return -log_sigmoid(beta * logits)


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


def sft_loss(b, beta, eps):
    # TRL 1.16: one token mean over every chosen token of the batch, from the unweighted sums
    s_c = b.get("S_c_unweighted", b["S_c"])
    return (-s_c.sum() / b["n_c"].sum()) * torch.ones_like(s_c)


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


def apo_zero_unpaired_loss(b, beta, eps, desirable_weight=1.0, undesirable_weight=1.0):
    """TRL 1.16 KTOTrainer, loss_type='apo_zero_unpaired', on pairs (desirable = chosen), halved as kto."""
    rc, rr = log_ratios(b)
    return (desirable_weight * (1 - sigmoid(beta * rc)) + undesirable_weight * sigmoid(beta * rr)) / 2


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
    if omega_max is None:  # no cap: only the exponent is bounded, at 50 (docs/losses.md)
        omega = torch.exp(torch.minimum(advantage / beta_aux, torch.tensor(50.0, dtype=F64))).detach()
    else:
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
    "cdpo": cdpo_loss,
    "robust": robust_loss,
    "hinge": hinge_loss,
    "ipo": ipo_loss,
    "sigmoid_norm": sigmoid_norm_loss,
    "aot": aot_loss,
    "aot_unpaired": aot_unpaired_loss,
    "minor_dpo": minor_dpo_loss,
    "alpha_dpo": alpha_dpo_loss,
    "mrpo": mrpo_loss,
    "sft": sft_loss,
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
    "apo_zero_unpaired": apo_zero_unpaired_loss,
    "upo": upo_loss,
}

REFERENCE_FREE = {"simpo", "orpo", "nll", "rpo", "upo", "sft"}
# what TRL 1.16 allows a non-default f_divergence_type with, plus upo's reference-free losses and cdpo
F_DIVERGENCE_LOSSES = {"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft", "cdpo",
                       "simpo", "orpo", "nll", "rpo", "upo"}
SORTING_LOSSES = {"aot", "aot_unpaired"}  # no WPO: entry i is not pair i
# losses whose oracle needs label_smoothing > 0
NEEDS_SMOOTHING = {"exo_pair"}


# ---------------------------------------------------------------- LD-DPO and WPO
def with_ld(b, ld_alpha):
    """The batch with LD-DPO sums: every S and R becomes shared + ld_alpha * (S - shared)."""
    out = dict(b, S_c_unweighted=b["S_c"])
    for key in ("S_c", "S_r", "R_c", "R_r"):
        out[key] = b[key + "_shared"] + ld_alpha * (b[key] - b[key + "_shared"])
    return out


def with_wpo(per_pair, b):
    return per_pair * b["w_c"].detach() * b["w_r"].detach()


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


def extra_references(generator: torch.Generator, batch, columns: int = 1):
    """MRPO's further reference models: the primary's log-probs moved by a few percent or far."""
    size = len(batch["S_c"])

    def around(primary):
        spread = torch.where(torch.rand(size, columns, generator=generator, dtype=F64) < 0.5, 0.03, 0.4)
        moved = primary.double()[:, None] * (1 + spread * torch.randn(size, columns, generator=generator, dtype=F64))
        return moved.clamp(max=-0.1).to(batch["S_c"].dtype)

    return dict(batch, E_c=around(batch["R_c"]), E_r=around(batch["R_r"]))


def token_statistics(generator: torch.Generator, batch):
    """Plausible LD-DPO and WPO inputs: shared-token sums and WPO weights (the keys with_ld / with_wpo read).

    The shorter response of a pair shares all its tokens; the longer one the fraction n_short / n_long
    of its sum. WPO weights lie in (0.05, 1].
    """
    out = dict(batch)
    short = torch.minimum(batch["n_c"], batch["n_r"])
    for side in ("c", "r"):
        fraction = short / batch[f"n_{side}"]
        out[f"S_{side}_shared"] = batch[f"S_{side}"] * fraction
        out[f"R_{side}_shared"] = batch[f"R_{side}"] * fraction
        weight = 0.05 + 0.95 * torch.rand(len(short), generator=generator, dtype=F64)
        out[f"w_{side}"] = weight.to(batch["S_c"].dtype)
    return out


def token_batch(generator: torch.Generator, batch: int = 5, width: int = 11, dtype=torch.float32, empty_prompt=False):
    """Per-token inputs in TRL's layout and the per-sequence values derived from them by plain loops.

    Rows ``[chosen_0..chosen_{B-1}, rejected_0..]`` of width ``width``: a prompt (>= 1 token, or
    none for row 0 with ``empty_prompt``), a completion of random length, right padding.
    ``completion_mask`` is TRL's un-shifted mask; per-token values live on the shifted positions
    ``t`` (predicting token ``t + 1``) and are 0 elsewhere, as TRL's fused head returns them.
    """
    rows = 2 * batch
    mask = torch.zeros(rows, width, dtype=torch.long)
    for row in range(rows):
        prompt = 0 if (empty_prompt and row % batch == 0) else int(torch.randint(1, 4, (), generator=generator))
        # at least one token with a log-prob: an empty prompt's first token has none
        length = int(torch.randint(1 if prompt else 2, width - prompt + 1, (), generator=generator))
        mask[row, prompt:prompt + length] = 1
    shift = mask[:, 1:].bool()

    def per_token(low, high):
        values = low + (high - low) * torch.rand(rows, width - 1, generator=generator, dtype=F64)
        return values.masked_fill(~shift, 0.0)

    policy = per_token(-6.0, -0.05)
    ref = (policy + 0.7 * torch.randn(rows, width - 1, generator=generator, dtype=F64)).clamp(max=-0.01)
    ref = ref.masked_fill(~shift, 0.0)
    # log sum_v p^2 <= log max_v p; any values below the token's own log-prob would do
    log_sum_sq = (policy - per_token(0.0, 2.0)).masked_fill(~shift, 0.0)
    out = {"completion_mask": mask, "policy_tokens": policy.to(dtype), "ref_tokens": ref.to(dtype),
           "log_sum_sq_tokens": log_sum_sq.to(dtype)}
    out.update(sequence_values(out, batch))
    return out


def sequence_values(tokens, batch):
    """S, R, n (shifted and un-shifted), the shared-token sums and the WPO weights, by loops over tokens."""
    mask = tokens["completion_mask"]
    shift = mask[:, 1:]
    policy, ref, lss = (tokens[k].double() for k in ("policy_tokens", "ref_tokens", "log_sum_sq_tokens"))
    rows = 2 * batch
    counts = [int(shift[row].sum()) for row in range(rows)]
    sums, ref_sums, shared, ref_shared, weights = [], [], [], [], []
    for row in range(rows):
        partner = row + batch if row < batch else row - batch
        keep = min(counts[row], counts[partner])
        seen = 0
        s = r = s_shared = r_shared = aligned = 0.0
        for t in range(shift.shape[1]):
            if shift[row, t]:
                seen += 1
                s, r = s + policy[row, t], r + ref[row, t]
                aligned = aligned + (policy[row, t] - lss[row, t])
                if seen <= keep:
                    s_shared, r_shared = s_shared + policy[row, t], r_shared + ref[row, t]
        sums.append(s)
        ref_sums.append(r)
        shared.append(s_shared)
        ref_shared.append(r_shared)
        weights.append(torch.exp(torch.as_tensor(aligned) / max(counts[row], 1)))

    def halves(values):
        values = torch.stack([torch.as_tensor(v, dtype=F64) for v in values])
        return values[:batch], values[batch:]

    out = {}
    for name, values in (("S", sums), ("R", ref_sums), ("S_shared", shared), ("R_shared", ref_shared), ("w", weights)):
        chosen, rejected = halves(values)
        first, rest = name.split("_", 1) if "_" in name else (name, "")
        suffix = f"_{rest}" if rest else ""
        out[f"{first}_c{suffix}"], out[f"{first}_r{suffix}"] = chosen, rejected
    n = torch.tensor(counts, dtype=F64)
    full = mask.sum(1).to(F64)  # TRL's ipo / sigmoid_norm count (un-shifted, clamped at 1)
    out.update(n_c=n[:batch], n_r=n[batch:], n_full_c=full[:batch], n_full_r=full[batch:])
    return out


def as_float64(batch):
    """Float64 leaves with gradients, holding exactly the values of ``batch`` (tensors only)."""
    return {key: value.detach().to(F64).requires_grad_(key in ("S_c", "S_r", "v_c", "S_c_shared", "S_r_shared"))
            if isinstance(value, torch.Tensor) and value.is_floating_point() else value
            for key, value in batch.items()}
