"""Properties of upo.losses that hold for every input (hypothesis draws fresh inputs each run)."""
import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import loss_oracle as oracle
import upo.losses as L

PROFILE = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# mrpo needs extra references, alpha_dpo two pairs (batch statistics), exo_pair label_smoothing > 0
NEEDS_MORE = {"mrpo", "alpha_dpo", "exo_pair"}
REFERENCE_LOSSES = sorted(set(oracle.ORACLES) - oracle.REFERENCE_FREE - NEEDS_MORE)
PAIRWISE_LOSSES = REFERENCE_LOSSES + ["simpo", "orpo"]
# functions of the log-ratios alone (aot sorts S_c - S_r and R_c - R_r separately)
LOG_RATIO_LOSSES = sorted(set(REFERENCE_LOSSES) - {"aot"})


def floats(low, high):
    return st.floats(low, high, allow_nan=False, allow_infinity=False)


@st.composite
def batches(draw, max_batch=6, columns=2):
    """Float64 inputs: log-probs in [-80, -0.5], log-ratios within +-10 nats, n in [1, 64]."""
    size = draw(st.integers(1, max_batch))

    def vector(low, high):
        return torch.tensor(draw(st.lists(floats(low, high), min_size=size, max_size=size)), dtype=torch.float64)

    s_c, s_r = vector(-80, -0.5), vector(-80, -0.5)
    aux = [draw(st.lists(floats(-3, 3), min_size=size * columns, max_size=size * columns)) for _ in range(2)]
    return {
        "S_c": s_c,
        "S_r": s_r,
        "R_c": s_c + vector(-10, 10),
        "R_r": s_r + vector(-10, 10),
        "n_c": torch.tensor(draw(st.lists(st.integers(1, 64), min_size=size, max_size=size)), dtype=torch.float64),
        "n_r": torch.tensor(draw(st.lists(st.integers(1, 64), min_size=size, max_size=size)), dtype=torch.float64),
        "a_c": torch.tensor(aux[0], dtype=torch.float64).reshape(size, columns),
        "a_r": torch.tensor(aux[1], dtype=torch.float64).reshape(size, columns),
        "v_c": vector(-2, 2),
    }


betas = floats(0.01, 2.0)
smoothings = floats(0.0, 0.45)


def run(batch, loss_type, *, grad=False, values=False, **kwargs):
    """upo.loss on a batch dict; returns the output and the leaves (S_c, S_r[, v_c] require grad)."""
    leaves = {
        key: value.detach().clone().requires_grad_(grad and key in ("S_c", "S_r", "v_c"))
        for key, value in batch.items()
    }
    out = L.loss(
        leaves["S_c"], leaves["S_r"], leaves["R_c"], leaves["R_r"], loss_type=loss_type,
        chosen_lengths=leaves["n_c"], rejected_lengths=leaves["n_r"],
        aux_rewards_chosen=leaves["a_c"], aux_rewards_rejected=leaves["a_r"],
        values_chosen=leaves["v_c"] if values else None, **kwargs,
    )
    return out, leaves


def swapped(batch):
    """The same pairs with chosen and rejected exchanged."""
    pairs = [("S_c", "S_r"), ("R_c", "R_r"), ("n_c", "n_r"), ("a_c", "a_r")]
    result = dict(batch)
    for chosen, rejected in pairs:
        result[chosen], result[rejected] = batch[rejected], batch[chosen]
    return result


def close(a, b, rel=1e-9, abs_=1e-9):
    return math.isclose(float(a), float(b), rel_tol=rel, abs_tol=abs_)


# ------------------------------------------------------------------ symmetry
@PROFILE
@given(batch=batches(), beta=betas, name=st.sampled_from(PAIRWISE_LOSSES))
def test_swapping_chosen_and_rejected_flips_margins(batch, beta, name):
    out, _ = run(batch, name, beta=beta)
    flipped, _ = run(swapped(batch), name, beta=beta)
    assert close(flipped.metrics["rewards/margins"], -out.metrics["rewards/margins"])
    assert close(flipped.metrics["rewards/chosen"], out.metrics["rewards/rejected"])
    chosen_wins = (out.metrics["rewards/accuracies"], flipped.metrics["rewards/accuracies"])
    assert chosen_wins[0] + chosen_wins[1] <= 1.0 + 1e-12  # ties count for neither


@PROFILE
@given(batch=batches(), beta=betas, eps=smoothings)
def test_sigmoid_loss_is_log2_at_zero_margin(batch, beta, eps):
    batch = dict(batch, R_c=batch["S_c"] + 1.5, R_r=batch["S_r"] + 1.5)  # equal log-ratios: h = 0
    out, _ = run(batch, "sigmoid", beta=beta, label_smoothing=eps)
    torch.testing.assert_close(out.losses, torch.full_like(out.losses, math.log(2)))


@PROFILE
@given(batch=batches(), beta=betas, eps=smoothings)
def test_cdpo_antisymmetry_and_sigmoid_ignores_smoothing(batch, beta, eps):
    # -(1-e) ls(x) - e ls(-x) minus the same at -x equals -(1-2e) x.
    out, _ = run(batch, "cdpo", beta=beta, label_smoothing=eps)
    flipped, _ = run(swapped(batch), "cdpo", beta=beta, label_smoothing=eps)
    margin = (batch["S_c"] - batch["R_c"]) - (batch["S_r"] - batch["R_r"])
    torch.testing.assert_close(out.losses - flipped.losses, -(1 - 2 * eps) * beta * margin)
    # TRL 1.16's sigmoid reads no label smoothing: it is cdpo at eps = 0
    smoothed, _ = run(batch, "sigmoid", beta=beta, label_smoothing=eps)
    plain, _ = run(batch, "cdpo", beta=beta)
    torch.testing.assert_close(smoothed.losses, plain.losses)


@PROFILE
@given(batch=batches(), beta=betas, eps=smoothings)
def test_robust_loss_is_unbiased_under_label_noise(batch, beta, eps):
    # (1-e) L_robust(h) + e L_robust(-h) = -log sigma(beta h): the clean DPO loss in expectation.
    out, _ = run(batch, "robust", beta=beta, label_smoothing=eps)
    flipped, _ = run(swapped(batch), "robust", beta=beta, label_smoothing=eps)
    clean, _ = run(batch, "sigmoid", beta=beta)
    torch.testing.assert_close((1 - eps) * out.losses + eps * flipped.losses, clean.losses)


# ------------------------------------------------------------------ ranges and invariances
BOUNDS = {
    "hinge": (0.0, None), "ipo": (0.0, None), "sppo_hard": (0.0, None), "exo_pair": (0.0, None),
    "nca_pair": (0.0, None), "bco_pair": (0.0, None), "sigmoid": (0.0, None), "robust": (None, None),
    "apo_zero": (0.0, 2.0), "apo_down": (0.0, 2.0), "kto": (0.0, 1.0), "discopop": (0.0, None),
    "simpo": (0.0, None), "orpo": (0.0, None), "nll": (0.0, None), "cdpo": (0.0, None), "sigmoid_norm": (0.0, None),
    "aot": (0.0, None), "aot_unpaired": (0.0, None), "minor_dpo": (0.0, None), "sft": (0.0, None),
}


@PROFILE
@given(batch=batches(), beta=betas, eps=smoothings, name=st.sampled_from(sorted(BOUNDS)))
def test_loss_ranges(batch, beta, eps, name):
    out, _ = run(batch, name, beta=beta, label_smoothing=eps)
    low, high = BOUNDS[name]
    assert torch.isfinite(out.losses).all()
    if low is not None:
        assert (out.losses >= low - 1e-12).all()
    if high is not None:
        assert (out.losses <= high + 1e-12).all()


@PROFILE
@given(batch=batches(), beta=betas, shift=floats(-20, 20), name=st.sampled_from(LOG_RATIO_LOSSES))
def test_reference_losses_depend_on_log_ratios_only(batch, beta, shift, name):
    # Adding the same constant to S and R of a response leaves its log-ratio unchanged.
    moved = dict(batch, S_c=batch["S_c"] - abs(shift), R_c=batch["R_c"] - abs(shift), S_r=batch["S_r"] - 1.0,
                 R_r=batch["R_r"] - 1.0)
    out, _ = run(batch, name, beta=beta)
    out_moved, _ = run(moved, name, beta=beta)
    torch.testing.assert_close(out.losses, out_moved.losses, rtol=1e-9, atol=1e-9)


@PROFILE
@given(batch=batches(), beta=betas, shift=floats(0, 1))
def test_simpo_depends_on_mean_logp_difference_only(batch, beta, shift):
    moved = dict(batch, S_c=batch["S_c"] - shift * batch["n_c"], S_r=batch["S_r"] - shift * batch["n_r"])
    out, _ = run(batch, "simpo", beta=beta)
    out_moved, _ = run(moved, "simpo", beta=beta)
    torch.testing.assert_close(out.losses, out_moved.losses, rtol=1e-9, atol=1e-9)


@PROFILE
@given(batch=batches(), beta=betas, eps=smoothings,
       name=st.sampled_from(["sigmoid", "robust", "simpo", "bco_pair", "apo_zero", "kto", "orpo", "minor_dpo",
                             "sigmoid_norm", "cdpo"]))
def test_gradients_raise_chosen_and_lower_rejected(batch, beta, eps, name):
    # Label smoothing gives sigmoid/simpo a finite optimum, past which they pull the margin back
    # (robust stays monotone for any eps); nca_pair does so by design once sigma(beta rho_c) > 2/3.
    eps = eps if name == "robust" else 0.0
    out, leaves = run(batch, name, grad=True, beta=beta, label_smoothing=eps)
    out.loss.backward()
    assert (leaves["S_c"].grad <= 1e-15).all()
    assert (leaves["S_r"].grad >= -1e-15).all()


@PROFILE
@given(batch=batches(), beta=betas, weights=st.lists(floats(-2, 2), min_size=3, max_size=3),
       names=st.lists(st.sampled_from(sorted(set(oracle.ORACLES) - NEEDS_MORE)), min_size=3, max_size=3, unique=True))
def test_combination_is_linear_in_its_terms(batch, beta, weights, names):
    combined, _ = run(batch, names, loss_weights=weights, beta=beta)
    expected = sum(w * run(batch, name, beta=beta)[0].losses for name, w in zip(names, weights))
    torch.testing.assert_close(combined.losses, expected, rtol=1e-9, atol=1e-9)
    assert set(combined.terms) == set(names)


# ------------------------------------------------------------------ TRL 1.16's additions and the seed's variants
@PROFILE
@given(batch=batches(), length=st.integers(1, 64))
def test_sft_equals_per_response_nll_at_equal_chosen_lengths(batch, length):
    batch = dict(batch, n_c=torch.full_like(batch["n_c"], float(length)))
    sft, _ = run(batch, "sft")
    nll, _ = run(batch, "nll")
    torch.testing.assert_close(sft.loss, nll.loss, rtol=1e-12, atol=1e-12)


@PROFILE
@given(batch=batches(), beta=betas)
def test_minor_dpo_stops_the_reject_penalty_below_the_reference(batch, beta):
    out, leaves = run(batch, "minor_dpo", grad=True, beta=beta)
    out.loss.backward()
    below = batch["S_r"] < batch["R_r"]
    assert (leaves["S_r"].grad[below] == 0).all()
    above = dict(batch, R_r=batch["S_r"] - (batch["R_r"] - batch["S_r"]).abs() - 0.1)  # every rho_r > 0
    minor, _ = run(above, "minor_dpo", beta=beta)
    dpo, _ = run(above, "sigmoid", beta=beta)
    torch.testing.assert_close(minor.losses, dpo.losses, rtol=1e-12, atol=1e-12)


@PROFILE
@given(batch=batches(), beta=betas, spread=floats(-0.5, 0.5), eta=floats(0.0, 1.0))
def test_mrpo_reduces_to_dpo_on_its_primary_reference(batch, beta, spread, eta):
    extra = {"extra_ref_chosen_logps": batch["R_c"] * (1 + spread),
             "extra_ref_rejected_logps": batch["R_r"] * (1 - spread)}
    dpo, _ = run(batch, "sigmoid", beta=beta)
    primary_only, _ = run(batch, "mrpo", beta=beta, mrpo_weights=[1.0, 0.0], mrpo_eta=eta, **extra)
    no_room, _ = run(batch, "mrpo", beta=beta, mrpo_eta=0.0, **extra)  # eta 0 clips every extra onto R_p
    torch.testing.assert_close(primary_only.losses, dpo.losses, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(no_room.losses, dpo.losses, rtol=1e-9, atol=1e-12)


@PROFILE
@given(batch=batches(), beta=betas, ratio=floats(0.0, 2.0))
def test_alpha_dpo_without_adaptive_margin_is_simpo(batch, beta, ratio):
    alpha, _ = run(batch, "alpha_dpo", beta=beta, margin_alpha=0.0, gamma_beta_ratio=ratio, margin_mean=0.0,
                   margin_std=1.0)
    simpo, _ = run(batch, "simpo", beta=beta, gamma_beta_ratio=ratio)
    torch.testing.assert_close(alpha.losses, simpo.losses, rtol=1e-9, atol=1e-12)


@PROFILE
@given(batch=batches(), beta=betas, name=st.sampled_from(["aot", "aot_unpaired"]), data=st.data())
def test_aot_loss_ignores_the_order_of_pairs(batch, beta, name, data):
    order = torch.tensor(data.draw(st.permutations(range(len(batch["S_c"])))))
    shuffled = {key: value[order] for key, value in batch.items()}
    out, _ = run(batch, name, beta=beta)
    moved, _ = run(shuffled, name, beta=beta)
    torch.testing.assert_close(out.loss, moved.loss, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ UPO
upo_settings = st.fixed_dictionaries({
    "upo_lambda": floats(0.0, 3.0),
    "beta_aux": floats(0.1, 5.0),
    "omega_max": floats(0.5, 50.0),
    "baseline": st.sampled_from(["pair_mean", "batch_mean"]),
})


def awr_weights(batch, beta_aux, omega_max, baseline):
    """omega per response [chosen..., rejected...], from docs/losses.md (UPO)."""
    reward = torch.cat([batch["a_c"], batch["a_r"]]).sum(dim=1)
    size = len(batch["S_c"])
    if baseline == "pair_mean":
        pair = (reward[:size] + reward[size:]) / 2
        base = torch.cat([pair, pair])
    else:
        base = reward.mean()
    return torch.clamp(torch.exp((reward - base) / beta_aux), max=omega_max)


@PROFILE
@given(batch=batches(), options=upo_settings, normalize=st.sampled_from(["mean", "sum"]))
def test_upo_gradient_is_advantage_weighted_likelihood(batch, options, normalize):
    # dL/dS = -lambda * omega / (n * M) with M = 2B responses (n = 1 for aux_normalize="sum").
    out, leaves = run(batch, "upo", grad=True, aux_normalize=normalize, **options)
    out.loss.backward()
    omega = awr_weights(batch, options["beta_aux"], options["omega_max"], options["baseline"])
    lengths = torch.cat([batch["n_c"], batch["n_r"]]) if normalize == "mean" else torch.ones(2 * len(batch["S_c"]))
    expected = -options["upo_lambda"] * omega / (lengths * 2 * len(batch["S_c"]))
    got = torch.cat([leaves["S_c"].grad, leaves["S_r"].grad])
    torch.testing.assert_close(got, expected.to(got.dtype), rtol=1e-9, atol=1e-12)
    assert out.metrics["aux/weight_mean"] <= options["omega_max"] * (1 + 1e-12)


@PROFILE
@given(batch=batches(), tau=floats(0.05, 0.95), upo_lambda=floats(0.0, 3.0))
def test_value_head_gets_only_the_expectile_gradient(batch, tau, upo_lambda):
    out, leaves = run(batch, ["sigmoid", "upo"], grad=True, values=True, expectile=tau, upo_lambda=upo_lambda)
    out.loss.backward()
    size = len(batch["S_c"])
    reward_c, reward_r = batch["a_c"].sum(dim=1), batch["a_r"].sum(dim=1)

    def d_expectile_d_value(u):  # d/dV of |tau - 1[u<0]| u^2 with u = r - V
        return -2 * torch.where(u < 0, torch.full_like(u, 1 - tau), torch.full_like(u, tau)) * u

    # V serves chosen and rejected; each response's term enters the mean over 2B responses.
    expected = (d_expectile_d_value(reward_c - batch["v_c"]) + d_expectile_d_value(reward_r - batch["v_c"]))
    expected = expected / (2 * size)
    torch.testing.assert_close(leaves["v_c"].grad, expected, rtol=1e-9, atol=1e-12)


@PROFILE
@given(batch=batches(), tau=floats(0.55, 0.95))
def test_expectile_penalises_underestimates_more(batch, tau):
    # With tau > 1/2 a value below the reward costs more than one equally far above it.
    rewards = batch["a_c"].sum(dim=1)
    low = dict(batch, a_r=batch["a_c"], v_c=rewards - 1.0)
    high = dict(batch, a_r=batch["a_c"], v_c=rewards + 1.0)
    under, _ = run(low, "upo", values=True, expectile=tau, upo_lambda=0.0)
    over, _ = run(high, "upo", values=True, expectile=tau, upo_lambda=0.0)
    assert close(under.metrics["value/loss"], tau) and close(over.metrics["value/loss"], 1 - tau)


@PROFILE
@given(batch=batches(), beta=betas)
def test_dtype_promotion(batch, beta):
    for dtype, expected in [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                            (torch.float32, torch.float32), (torch.float64, torch.float64)]:
        cast = {key: value.to(dtype) if key in ("S_c", "S_r", "R_c", "R_r") else value for key, value in batch.items()}
        out, _ = run(cast, "sigmoid", beta=beta)
        assert out.loss.dtype == expected and out.losses.dtype == expected
