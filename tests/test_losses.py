"""upo.losses against independent float64 formulas (tests/loss_oracle.py), input checks, TRL CPO/ORPO parity.

Inputs are fresh each run: two fixed seeds plus one drawn at import (shown in the test id;
set UPO_TEST_SEED to replay it).
"""
import math
import os
import random
from types import SimpleNamespace

import pytest
import torch

import loss_oracle as oracle
import upo
import upo.losses as L


RUN_SEED = int(os.environ.get("UPO_TEST_SEED", random.randrange(2**31)))
SEEDS = [0, 1, RUN_SEED]
ALL_LOSSES = sorted(oracle.ORACLES)
F64_TOL = dict(rtol=1e-10, atol=1e-12)
F32_LOSS_TOL = dict(rtol=1e-5, atol=1e-6)
F32_GRAD_TOL = dict(rtol=1e-4, atol=1e-6)


def make_batch(seed, dtype=torch.float32, extra_columns=1, **kwargs):
    """random_batch plus MRPO's extra references E_c, E_r (other losses ignore them)."""
    print(f"inputs from seed {seed} (UPO_TEST_SEED={RUN_SEED} replays this run)")  # shown on failure
    generator = torch.Generator().manual_seed(seed)
    batch = oracle.random_batch(generator, dtype=dtype, **kwargs)
    return oracle.token_statistics(generator, oracle.extra_references(generator, batch, extra_columns))


LEAVES = ("S_c", "S_r", "v_c", "S_c_shared", "S_r_shared")


def call_loss(batch, loss_type, *, values=False, reference=True, lengths=True, **kwargs):
    """upo.loss on a batch dict; S_c, S_r (v_c, shared sums) become fresh leaves so grads can be read."""
    leaves = {key: batch[key].detach().clone().requires_grad_(key in LEAVES) for key in batch}
    given = [("E_c", "extra_ref_chosen_logps"), ("E_r", "extra_ref_rejected_logps")] if reference else []
    if kwargs.get("ld_alpha") is not None:
        given += [("S_c_shared", "chosen_shared_logps"), ("S_r_shared", "rejected_shared_logps")]
        if reference:
            given += [("R_c_shared", "ref_chosen_shared_logps"), ("R_r_shared", "ref_rejected_shared_logps")]
    if kwargs.get("use_weighting"):
        given += [("w_c", "chosen_wpo_weights"), ("w_r", "rejected_wpo_weights")]
    for key, argument in given:
        if key in leaves:
            kwargs.setdefault(argument, leaves[key])
    out = L.loss(
        leaves["S_c"],
        leaves["S_r"],
        leaves["R_c"] if reference else None,
        leaves["R_r"] if reference else None,
        loss_type=loss_type,
        chosen_lengths=leaves["n_c"] if lengths else None,
        rejected_lengths=leaves["n_r"] if lengths else None,
        aux_rewards_chosen=leaves["a_c"],
        aux_rewards_rejected=leaves["a_r"],
        values_chosen=leaves["v_c"] if values else None,
        **kwargs,
    )
    return out, leaves


def oracle_loss(batch, name, *, beta=0.1, label_smoothing=0.0, values=False, f=None, ld_alpha=None, wpo=False,
                **options):
    b64 = oracle.as_float64(batch)
    if name == "upo":
        options["use_values"] = values
    inputs = dict(b64, f=f) if f else b64
    inputs = oracle.with_ld(inputs, ld_alpha) if ld_alpha is not None else inputs
    per_pair = oracle.ORACLES[name](inputs, beta, label_smoothing, **options)
    return (oracle.with_wpo(per_pair, b64) if wpo else per_pair), b64


def batch_options(f=None, ld_alpha=None, wpo=False):
    """upo.loss keyword arguments for TRL's batch options; the batch keys they read are filled in by call_loss."""
    kwargs = {}
    if f:
        kwargs.update(f_divergence_type=f[0], f_alpha_divergence_coef=f[1])
    if ld_alpha is not None:
        kwargs.update(ld_alpha=ld_alpha)
    if wpo:
        kwargs.update(use_weighting=True)
    return kwargs


def assert_matches_oracle(batch, name, dtype, *, beta=0.1, label_smoothing=0.0, values=False, f=None, ld_alpha=None,
                          wpo=False, reference=True, **options):
    out, leaves = call_loss(batch, name, beta=beta, label_smoothing=label_smoothing, values=values,
                            reference=reference, **batch_options(f, ld_alpha, wpo), **options)
    expected, b64 = oracle_loss(batch, name, beta=beta, label_smoothing=label_smoothing, values=values, f=f,
                                ld_alpha=ld_alpha, wpo=wpo, **options)
    loss_tol = F64_TOL if dtype == torch.float64 else F32_LOSS_TOL
    grad_tol = F64_TOL if dtype == torch.float64 else F32_GRAD_TOL

    assert out.loss.dtype == torch.promote_types(dtype, torch.float32)
    torch.testing.assert_close(out.losses.double(), expected.detach(), **loss_tol)
    torch.testing.assert_close(out.loss.double(), expected.mean().detach(), **loss_tol)
    torch.testing.assert_close(out.terms[name].double(), expected.mean().detach(), **loss_tol)

    out.loss.backward()
    expected.mean().backward()
    for key in ("S_c", "S_r") + (("v_c",) if values else ()) + (("S_c_shared", "S_r_shared") if ld_alpha is not None
                                                                 else ()):
        got, want = leaves[key].grad, b64[key].grad  # None: the loss does not depend on it
        got = torch.zeros(len(leaves[key]), dtype=torch.float64) if got is None else got.double()
        want = torch.zeros_like(got) if want is None else want
        torch.testing.assert_close(got, want, **grad_tol, msg=lambda m: f"d loss / d {key} ({name}): {m}")
    return out


# ------------------------------------------------------------------ every loss vs the oracle
@pytest.mark.parametrize("seed", SEEDS, ids=lambda s: f"seed{s}" if s in (0, 1) else "seed-fresh")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("name", ALL_LOSSES)
def test_loss_matches_float64_oracle(name, dtype, seed):
    eps = 1e-3 if name in oracle.NEEDS_SMOOTHING else 0.0
    assert_matches_oracle(make_batch(seed, dtype), name, dtype, label_smoothing=eps)


OPTION_CASES = [
    ("sigmoid", dict(label_smoothing=0.2, beta=0.5)),  # ignored, as TRL 1.16
    ("cdpo", dict(label_smoothing=0.2, beta=0.5)),
    ("robust", dict(label_smoothing=0.3, beta=0.3)),
    ("exo_pair", dict(label_smoothing=0.1)),
    ("hinge", dict(beta=1.0)),
    ("ipo", dict(beta=0.05)),
    ("sigmoid_norm", dict(beta=2.0)),
    ("aot", dict(label_smoothing=0.1, beta=0.3)),
    ("aot_unpaired", dict(label_smoothing=0.25)),
    ("bco_pair", dict(bco_delta=0.3)),
    ("bco_pair", dict(bco_delta="batch_mean")),
    ("minor_dpo", dict(beta=0.5)),
    ("alpha_dpo", dict(margin_alpha=0.05, gamma_beta_ratio=0.15, beta=2.5, label_smoothing=0.1)),
    ("alpha_dpo", dict(margin_mean=0.3, margin_std=2.0, beta=10.0)),
    ("mrpo", dict(mrpo_eta=0.3, beta=0.5)),
    ("mrpo", dict(mrpo_eta=0.05, mrpo_eta_mode="fixed")),
    ("mrpo", dict(mrpo_weights=[0.3, 0.7])),
    ("mrpo", dict(mrpo_weights=[2.0, 0.0], mrpo_eta=1.0)),
    ("discopop", dict(discopop_tau=0.5, beta=0.3)),
    ("simpo", dict(gamma=1.3, beta=2.0)),
    ("simpo", dict(gamma_beta_ratio=0.5, beta=2.0, label_smoothing=0.1)),
    ("orpo", dict(orpo_lambda=0.7)),
    ("nll", dict(alpha=0.25)),
    ("rpo", dict(alpha=2.0)),
    ("kto", dict(desirable_weight=1.33, undesirable_weight=0.5)),
    ("kto", dict(kl=0.4, beta=0.5)),
    ("upo", dict(upo_lambda=0.3, beta_aux=0.5, omega_max=2.0)),
    ("upo", dict(baseline="batch_mean", aux_normalize="sum", aux_weights=[0.5, -2.0])),
    ("upo", dict(values=True, expectile=0.9)),
    ("upo", dict(values=True, baseline="pair_mean")),
    ("upo", dict(values=True, baseline="value", beta_aux=3.0, omega_max=5.0)),
    ("upo", dict(omega_max=None, beta_aux=0.3)),
]


@pytest.mark.parametrize("seed", SEEDS, ids=lambda s: f"seed{s}" if s in (0, 1) else "seed-fresh")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("name, options", OPTION_CASES, ids=[f"{n}-{'-'.join(o)}" for n, o in OPTION_CASES])
def test_loss_options_match_oracle(name, options, dtype, seed):
    assert_matches_oracle(make_batch(seed, dtype), name, dtype, **options)


@pytest.mark.parametrize("seed", SEEDS, ids=lambda s: f"seed{s}" if s in (0, 1) else "seed-fresh")
@pytest.mark.parametrize("weights", [[0.2, 0.5, 0.3], [1.0, 1.0, 2.0]], ids=["normalised", "unnormalised"])
def test_mrpo_with_several_extra_references(weights, seed):
    batch = make_batch(seed, torch.float64, extra_columns=2)
    assert_matches_oracle(batch, "mrpo", torch.float64, mrpo_weights=weights, mrpo_eta=0.2)


F_DIVERGENCES = [("forward_kl", 0.5), ("js_divergence", 0.5), ("alpha_divergence", 0.3),
                 ("alpha_divergence", 1.6), ("alpha_divergence", 1.0)]
F_LOSSES = sorted(oracle.F_DIVERGENCE_LOSSES - {"rpo"})


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("f", F_DIVERGENCES, ids=lambda f: f"{f[0]}-{f[1]}")
@pytest.mark.parametrize("name", F_LOSSES)
def test_f_divergence_matches_oracle(name, f, dtype):
    eps = 0.1 if name in ("robust", "exo_pair", "cdpo") else 0.0
    assert_matches_oracle(make_batch(RUN_SEED, dtype), name, dtype, f=f, label_smoothing=eps)


def test_f_divergence_metrics_use_raw_log_ratios():
    batch = make_batch(RUN_SEED, torch.float64)
    plain, _ = call_loss(batch, "sigmoid")
    forward, _ = call_loss(batch, "sigmoid", f_divergence_type="forward_kl")
    assert plain.metrics == {key: value for key, value in forward.metrics.items()}
    assert not torch.allclose(plain.loss, forward.loss)


LD_WPO_CASES = [
    ("sigmoid", dict(ld_alpha=0.5)),
    ("ipo", dict(ld_alpha=0.0)),
    ("sft", dict(ld_alpha=0.3)),  # reads the unweighted sums
    ("simpo", dict(ld_alpha=0.7, reference=False)),
    ("aot", dict(ld_alpha=0.2, label_smoothing=0.1)),
    ("alpha_dpo", dict(ld_alpha=0.4)),
    ("kto", dict(ld_alpha=0.9)),
    ("upo", dict(ld_alpha=0.5, reference=False)),
    ("sigmoid", dict(wpo=True)),
    ("sft", dict(wpo=True)),  # TRL 1.16 crashes on this pair; upo weights it like any term
    ("ipo", dict(wpo=True, ld_alpha=0.6)),
    ("minor_dpo", dict(wpo=True)),
    ("mrpo", dict(wpo=True)),
    ("discopop", dict(wpo=True, ld_alpha=0.5, f=("js_divergence", 0.5))),
    ("orpo", dict(wpo=True, reference=False)),
]


@pytest.mark.parametrize("seed", SEEDS, ids=lambda s: f"seed{s}" if s in (0, 1) else "seed-fresh")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("name, options", LD_WPO_CASES, ids=[f"{n}-{'-'.join(o)}" for n, o in LD_WPO_CASES])
def test_ld_alpha_and_wpo_match_oracle(name, options, dtype, seed):
    assert_matches_oracle(make_batch(seed, dtype), name, dtype, **options)


def test_ld_alpha_one_and_unit_wpo_weights_change_nothing():
    batch = make_batch(RUN_SEED, torch.float64)
    names = ["sigmoid", "ipo", "sft", "bco_pair"]
    plain, _ = call_loss(batch, names)
    ld_one, _ = call_loss(batch, names, ld_alpha=1.0)
    ones = torch.ones_like(batch["S_c"])
    unit, _ = call_loss(batch, names, use_weighting=True, chosen_wpo_weights=ones, rejected_wpo_weights=ones)
    for other in (ld_one, unit):
        torch.testing.assert_close(other.losses, plain.losses, **F64_TOL)
        assert other.metrics == pytest.approx(plain.metrics)


def test_ld_alpha_metrics_use_weighted_sums():
    batch = make_batch(RUN_SEED, torch.float64)
    out, _ = call_loss(batch, "sigmoid", ld_alpha=0.25, beta=0.2)
    ld = oracle.with_ld(oracle.as_float64(batch), 0.25)
    assert out.metrics["logps/chosen"] == pytest.approx(ld["S_c"].mean().item())
    assert out.metrics["rewards/rejected"] == pytest.approx((0.2 * (ld["S_r"] - ld["R_r"])).mean().item())


def test_wpo_weights_are_detached():
    batch = make_batch(RUN_SEED, torch.float64)
    weight = batch["w_c"].clone().requires_grad_(True)
    out = L.loss(batch["S_c"].requires_grad_(True), batch["S_r"], batch["R_c"], batch["R_r"], use_weighting=True,
                 chosen_wpo_weights=weight, rejected_wpo_weights=batch["w_r"])
    out.loss.backward()
    assert weight.grad is None and batch["S_c"].grad is not None


def test_upo_omega_max_actually_clamps():
    batch = make_batch(3, columns=1)
    batch["a_c"] = torch.full_like(batch["a_c"], 10.0)  # advantages of +-10 / beta_aux: far past omega_max
    batch["a_r"] = torch.full_like(batch["a_r"], -10.0)
    out = assert_matches_oracle(batch, "upo", torch.float32, omega_max=4.0, beta_aux=0.5)
    expected_mean = (4.0 + math.exp(-20.0)) / 2
    assert out.metrics["aux/weight_mean"] == pytest.approx(expected_mean, rel=1e-6)


def test_upo_without_omega_max_caps_nothing_but_stays_finite():
    batch = make_batch(3, columns=1)
    batch["a_c"] = torch.full_like(batch["a_c"], 3.0)  # pair-mean advantages of 3: exp(3 / 0.5) ~ 403, past 20
    batch["a_r"] = torch.full_like(batch["a_r"], -3.0)
    out = assert_matches_oracle(batch, "upo", torch.float32, omega_max=None, beta_aux=0.5)
    assert out.metrics["aux/weight_max"] == pytest.approx(math.exp(6.0), rel=1e-5)
    batch["a_c"] = torch.full_like(batch["a_c"], 1e4)  # exp would overflow to inf: the exponent stops at 50
    batch["a_r"] = torch.full_like(batch["a_r"], -1e4)
    out = assert_matches_oracle(batch, "upo", torch.float32, omega_max=None)
    assert math.isfinite(out.loss.item()) and out.metrics["aux/weight_max"] == pytest.approx(math.exp(50.0), rel=1e-5)


def test_aux_rewards_as_vectors_equal_one_column():
    batch = make_batch(4, columns=1)
    out_matrix, _ = call_loss(batch, "upo")
    vector_batch = dict(batch, a_c=batch["a_c"][:, 0], a_r=batch["a_r"][:, 0])
    out_vector, _ = call_loss(vector_batch, "upo")
    torch.testing.assert_close(out_matrix.losses, out_vector.losses)


def test_values_rejected_alone_and_both_values():
    batch = make_batch(5)
    shared = batch["v_c"]
    args = (batch["S_c"], batch["S_r"])
    common = dict(loss_type="upo", chosen_lengths=batch["n_c"], rejected_lengths=batch["n_r"],
                  aux_rewards_chosen=batch["a_c"], aux_rewards_rejected=batch["a_r"])
    only_chosen = L.loss(*args, values_chosen=shared, **common)
    only_rejected = L.loss(*args, values_rejected=shared, **common)
    both = L.loss(*args, values_chosen=shared, values_rejected=shared, **common)
    torch.testing.assert_close(only_chosen.losses, only_rejected.losses)
    torch.testing.assert_close(only_chosen.losses, both.losses)
    different = L.loss(*args, values_chosen=shared, values_rejected=shared + 1.0, **common)
    assert not torch.allclose(different.losses, both.losses)


# ------------------------------------------------------------------ combinations, terms, metrics
@pytest.mark.parametrize(
    "names, weights",
    [(["sigmoid", "nll"], [1.0, 0.2]), (["sigmoid", "upo"], None), (["kto", "upo", "rpo"], [0.5, 2.0, 0.1]),
     (["simpo", "orpo"], [1.0, -0.5])],
)
def test_combination_is_weighted_sum_of_terms(names, weights):
    batch = make_batch(RUN_SEED, torch.float64)
    out, _ = call_loss(batch, names, loss_weights=weights, beta=0.2)
    expected = torch.zeros(len(batch["S_c"]), dtype=torch.float64)
    for name, weight in zip(names, weights or [1.0] * len(names)):
        per_pair, _ = oracle_loss(batch, name, beta=0.2)
        expected = expected + weight * per_pair.detach()
        torch.testing.assert_close(out.terms[name], per_pair.mean().detach(), **F64_TOL)
    assert list(out.terms) == names
    torch.testing.assert_close(out.losses, expected, **F64_TOL)
    torch.testing.assert_close(out.loss, expected.mean(), **F64_TOL)


BASE_METRICS = {
    "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected",
}
UPO_METRICS = {"aux/advantage_mean", "aux/advantage_std", "aux/weight_mean", "aux/weight_max", "aux/beta_aux",
               "aux/reward_chosen", "aux/reward_rejected", "value/loss"}


@pytest.mark.parametrize(
    "names, extra",
    [("sigmoid", set()), (["sigmoid", "upo"], UPO_METRICS), ("kto", {"kto/kl"}), ("bco_pair", {"bco/delta"}),
     ("orpo", {"orpo/nll_loss", "orpo/log_odds_ratio", "orpo/log_odds_chosen"})],
)
def test_metric_keys_and_types(names, extra):
    out, _ = call_loss(make_batch(0), names)
    assert set(out.metrics) == BASE_METRICS | extra
    assert all(type(value) is float for value in out.metrics.values())
    assert out.loss.ndim == 0 and out.loss.requires_grad
    assert all(term.ndim == 0 for term in out.terms.values())


def test_reward_metrics_with_reference():
    batch = make_batch(RUN_SEED, torch.float64)
    beta = 0.3
    out, _ = call_loss(batch, "sigmoid", beta=beta)
    chosen = beta * (batch["S_c"] - batch["R_c"])
    rejected = beta * (batch["S_r"] - batch["R_r"])
    assert out.metrics["rewards/chosen"] == pytest.approx(chosen.mean().item())
    assert out.metrics["rewards/rejected"] == pytest.approx(rejected.mean().item())
    assert out.metrics["rewards/margins"] == pytest.approx((chosen - rejected).mean().item())
    assert out.metrics["rewards/accuracies"] == pytest.approx((chosen > rejected).double().mean().item())
    assert out.metrics["logps/chosen"] == pytest.approx(batch["S_c"].mean().item())
    assert out.metrics["logps/rejected"] == pytest.approx(batch["S_r"].mean().item())


def test_reward_metrics_without_reference():
    batch = make_batch(RUN_SEED, torch.float64)
    with_lengths, _ = call_loss(batch, "simpo", reference=False, beta=2.0)
    assert with_lengths.metrics["rewards/chosen"] == pytest.approx((2.0 * batch["S_c"] / batch["n_c"]).mean().item())
    sums = L.loss(batch["S_c"], batch["S_r"], loss_type="nll", chosen_lengths=batch["n_c"], beta=2.0)
    assert sums.metrics["rewards/rejected"] == pytest.approx((2.0 * batch["S_r"]).mean().item())


def test_upo_metrics_values():
    batch = make_batch(RUN_SEED, torch.float64)
    out, _ = call_loss(batch, ["sigmoid", "upo"], values=True)
    parts = oracle.upo_parts(oracle.as_float64(batch), 0.1, 0.0)
    batch_size = len(batch["S_c"])
    assert out.metrics["aux/advantage_mean"] == pytest.approx(parts["advantage"].mean().item())
    assert out.metrics["aux/weight_mean"] == pytest.approx(parts["omega"].mean().item())
    assert out.metrics["aux/advantage_std"] == pytest.approx(parts["advantage"].std(unbiased=False).item())
    assert out.metrics["aux/weight_max"] == pytest.approx(parts["omega"].max().item())
    assert out.metrics["aux/reward_chosen"] == pytest.approx(parts["reward"][:batch_size].mean().item())
    assert out.metrics["aux/reward_rejected"] == pytest.approx(parts["reward"][batch_size:].mean().item())
    assert out.metrics["value/loss"] == pytest.approx(parts["value"].mean().item())
    no_values, _ = call_loss(batch, "upo")
    assert no_values.metrics["value/loss"] == 0.0


def test_low_precision_inputs_compute_in_float32():
    batch = make_batch(0)
    logps = ("S_c", "S_r", "R_c", "R_r")
    bf16 = {key: value.to(torch.bfloat16) if key in logps else value for key, value in batch.items()}
    out, leaves = call_loss(bf16, "sigmoid")
    assert out.loss.dtype == torch.float32
    out.loss.backward()
    assert leaves["S_c"].grad.dtype == torch.bfloat16
    expected, _ = oracle_loss({k: v.float() for k, v in bf16.items()}, "sigmoid")
    torch.testing.assert_close(out.losses.double(), expected.detach(), **F32_LOSS_TOL)


def test_value_loss_trains_values_only_and_aux_term_trains_policy_only():
    batch = make_batch(RUN_SEED)
    with_values, leaves_v = call_loss(batch, "upo", values=True, baseline="pair_mean")
    without, leaves = call_loss(batch, "upo", baseline="pair_mean")
    with_values.loss.backward()
    without.loss.backward()
    # The advantage baseline is detached and the value loss ignores S: policy grads are equal.
    torch.testing.assert_close(leaves_v["S_c"].grad, leaves["S_c"].grad)
    torch.testing.assert_close(leaves_v["S_r"].grad, leaves["S_r"].grad)
    assert leaves_v["v_c"].grad is not None and leaves_v["v_c"].grad.abs().sum() > 0


# ------------------------------------------------------------------ value head
def test_value_head_shapes_dtype_and_detached_input():
    head = upo.ValueHead(16)
    hidden = torch.randn(5, 16, dtype=torch.bfloat16, requires_grad=True)
    values = head(hidden)
    assert values.shape == (5,) and values.dtype == torch.float32
    assert torch.all(values == 0)  # zero-initialised projection: neutral first baseline
    batch = make_batch(0, batch=5)
    out = L.loss(batch["S_c"], batch["S_r"], loss_type="upo", chosen_lengths=batch["n_c"],
                 rejected_lengths=batch["n_r"], aux_rewards_chosen=batch["a_c"],
                 aux_rewards_rejected=batch["a_r"], values_chosen=values)
    out.loss.backward()
    assert hidden.grad is None
    assert head.proj.weight.grad.abs().sum() > 0 and head.proj.bias.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="prompt_hidden"):
        head(torch.randn(5, 8))


# ------------------------------------------------------------------ registry
def test_available_losses_lists_every_loss():
    assert L.available_losses() == sorted(oracle.ORACLES)


def test_loss_spec_gives_the_registered_spec():
    spec = L.loss_spec("simpo")
    assert isinstance(spec, L.LossSpec)
    assert spec.name == "simpo"
    assert not spec.needs_reference
    assert L.loss_spec("sigmoid").needs_reference
    assert L.loss_spec("rpo").name == "nll"  # an alias gives its loss's spec
    with pytest.raises(ValueError, match="'no_such_loss'.*sigmoid"):
        L.loss_spec("no_such_loss")


def test_register_loss_adds_a_loss_with_declared_options():
    name = f"test_margin_{random.randrange(10**9)}"

    @L.register_loss(name, needs_reference=True, options={"scale": 2.0})
    def _margin(ctx):
        return -ctx.options["scale"] * ctx.beta * ctx.margin, {"test/scale": ctx.options["scale"]}

    batch = make_batch(0, torch.float64)
    out, _ = call_loss(batch, name, scale=3.0)
    expected = -3.0 * 0.1 * ((batch["S_c"] - batch["R_c"]) - (batch["S_r"] - batch["R_r"]))
    torch.testing.assert_close(out.losses, expected)
    assert out.metrics["test/scale"] == 3.0
    assert name in L.available_losses()
    with pytest.raises(ValueError, match=name):
        L.register_loss(name, needs_reference=False)(_margin)
    with pytest.raises(ValueError, match="scale"):
        call_loss(batch, "sigmoid", scale=1.0)


# ------------------------------------------------------------------ bad input
def bad(argument, loss_type="sigmoid", **changes):
    return pytest.param(loss_type, changes, argument, id=f"{loss_type}-{argument}-{'-'.join(changes)}")


NAN = float("nan")
INF = float("inf")


def _with(key, index, value):
    def change(batch):
        tensor = batch[key].clone()
        tensor.view(-1)[index] = value
        return tensor
    return change


LENGTH_LOSSES = ("ipo", "sigmoid_norm", "simpo", "orpo", "nll", "sft", "alpha_dpo", "upo")  # the losses that divide by n
BAD_INPUTS = [
    bad("policy_rejected_logps", S_r=lambda b: torch.zeros(7)),
    bad("policy_chosen_logps", S_c=lambda b: torch.zeros(6, 1)),
    bad("policy_chosen_logps", S_c=lambda b: torch.zeros(6, dtype=torch.long)),
    bad("ref_chosen_logps", R_c=lambda b: torch.zeros(5)),
    bad("ref_rejected_logps", R_r=lambda b: torch.zeros(2, 6)),
    bad("chosen_lengths", "ipo", n_c=lambda b: torch.ones(3)),
    bad("values_chosen", "upo", v_c=lambda b: torch.zeros(6, 1)),
    bad("aux_rewards", "upo", a_c=lambda b: torch.zeros(6, 3)),
    bad("aux_rewards_chosen", "upo", a_c=lambda b: torch.zeros(5, 2)),
    bad("aux_rewards_rejected", "upo", a_r=lambda b: torch.zeros(6, 2, 1)),
    bad("ref_chosen_logps", R_c=None, R_r=None),
    bad("ref_chosen_logps", "kto", R_c=None, R_r=None),
    bad("ref_rejected_logps", "simpo", R_r=None),
    bad("chosen_lengths", "ipo", n_c=None),
    bad("rejected_lengths", "simpo", n_r=None),
    bad("chosen_lengths", "orpo", n_c=None, n_r=None),
    bad("chosen_lengths", "nll", n_c=None),
    bad("chosen_lengths", "upo", n_c=None),
    bad("chosen_lengths", "ipo", n_c=_with("n_c", 2, 0.0)),
    bad("rejected_lengths", "simpo", n_r=_with("n_r", 0, -3.0)),
    bad("policy_chosen_logps", S_c=_with("S_c", 1, NAN)),
    bad("policy_rejected_logps", S_r=_with("S_r", 0, -INF)),
    bad("ref_chosen_logps", R_c=_with("R_c", 3, INF)),
    bad("ref_rejected_logps", R_r=_with("R_r", 5, NAN)),
    bad("chosen_lengths", "ipo", n_c=_with("n_c", 0, INF)),
    bad("aux_rewards_chosen", "upo", a_c=_with("a_c", 4, NAN)),
    bad("aux_rewards_rejected", "upo", a_r=_with("a_r", 0, INF)),
    bad("values_chosen", "upo", v_c=_with("v_c", 2, NAN)),
    bad("aux_rewards_chosen", "upo", a_c=None, a_r=None),
    bad("aux_rewards_rejected", "upo", a_r=None),
    bad("policy_chosen_logps", "orpo", S_c=lambda b: b["S_c"].abs()),
    # issue 34: lengths are whole token counts > 0, inputs on the batch's device
    *[bad("chosen_lengths", name, n_c=_with("n_c", 1, 2.5)) for name in LENGTH_LOSSES],
    *[bad("rejected_lengths", name, n_r=_with("n_r", 0, 0.5)) for name in LENGTH_LOSSES if name not in ("nll", "sft")],
    bad("chosen_lengths", "ipo", n_c=lambda b: torch.ones(6, dtype=torch.bool)),
    bad("chosen_lengths", "simpo", n_c=lambda b: [True] * 6),
    bad("chosen_lengths", "ipo", n_c=lambda b: [2.5] + [3.0] * 5),
    bad("chosen_lengths", "ipo", n_c=lambda b: "many"),
    bad("ref_chosen_logps", R_c=lambda b: b["R_c"].to("meta")),
    bad("ref_rejected_logps", R_r=lambda b: b["R_r"].to("meta")),
    bad("aux_rewards_chosen", "upo", a_c=lambda b: b["a_c"].to("meta")),
    bad("values_chosen", "upo", v_c=lambda b: b["v_c"].to("meta")),
    bad("aux_rewards_rejected", "upo", a_r=lambda b: "high"),
]


@pytest.mark.parametrize("loss_type, changes, argument", BAD_INPUTS)
def test_bad_tensor_input_names_the_argument(loss_type, changes, argument):
    batch = make_batch(0)
    batch.update({key: change(batch) if callable(change) else change for key, change in changes.items()})
    args = dict(
        chosen_lengths=batch["n_c"], rejected_lengths=batch["n_r"],
        aux_rewards_chosen=batch["a_c"], aux_rewards_rejected=batch["a_r"], values_chosen=batch["v_c"],
    )
    with pytest.raises(ValueError, match=argument):
        L.loss(batch["S_c"], batch["S_r"], batch["R_c"], batch["R_r"], loss_type=loss_type, **args)


BAD_SETTINGS = [
    ("label_smoothing", dict(label_smoothing=0.5)),
    ("label_smoothing", dict(label_smoothing=-0.1)),
    ("beta", dict(beta=0.0)),
    ("beta", dict(beta=-1.0)),
    ("beta", dict(beta=NAN)),
    ("loss_weights", dict(loss_weights=[1.0, 2.0])),
    ("loss_weights", dict(loss_type=["sigmoid", "nll"], loss_weights=[1.0])),
    ("loss_weights", dict(loss_weights=[NAN])),
    ("loss_type", dict(loss_type="dpo")),
    ("loss_type", dict(loss_type=["sigmoid", "sigmoid"])),
    ("loss_type", dict(loss_type=[])),
    ("gama", dict(loss_type="simpo", gama=1.0)),
    ("gamma", dict(loss_type="sigmoid", gamma=1.0)),
    ("upo_lamda", dict(loss_type=["sigmoid", "upo"], upo_lamda=1.0)),
    ("gamma_beta_ratio", dict(loss_type="simpo", gamma=1.0, gamma_beta_ratio=0.5)),
    ("gamma", dict(loss_type="simpo", gamma="big")),
    ("discopop_tau", dict(loss_type="discopop", discopop_tau=0.0)),
    ("orpo_lambda", dict(loss_type="orpo", orpo_lambda=-1.0)),
    ("desirable_weight", dict(loss_type="kto", desirable_weight=-1.0)),
    ("kl", dict(loss_type="kto", kl=[0.1, 0.2])),
    ("bco_delta", dict(loss_type="bco_pair", bco_delta=NAN)),
    ("alpha", dict(loss_type="nll", alpha=INF)),
    ("values_chosen", dict(loss_type="upo", baseline="value")),
    ("baseline", dict(loss_type="upo", baseline="median")),
    ("aux_normalize", dict(loss_type="upo", aux_normalize="max")),
    ("aux_weights", dict(loss_type="upo", aux_weights=[1.0, 2.0, 3.0])),
    ("aux_weights", dict(loss_type="upo", aux_weights=[1.0, NAN])),
    ("expectile", dict(loss_type="upo", expectile=1.5)),
    ("beta_aux", dict(loss_type="upo", beta_aux=0.0)),
    ("omega_max", dict(loss_type="upo", omega_max=-2.0)),
    ("upo_lambda", dict(loss_type="upo", upo_lambda=INF)),
    ("label_smoothing", dict(loss_type="exo_pair")),  # log(0), as TRL 1.16
    ("bco_delta", dict(loss_type="bco_pair", bco_delta="running_mean")),
    ("f_divergence_type", dict(f_divergence_type="kl")),
    ("f_divergence_type", dict(loss_type="apo_zero", f_divergence_type="forward_kl")),
    ("f_divergence_type", dict(loss_type=["sigmoid", "kto"], f_divergence_type="js_divergence")),
    ("f_divergence_type", dict(loss_type=["ipo", "aot"], f_divergence_type="alpha_divergence")),
    ("f_divergence_type", dict(loss_type="mrpo", f_divergence_type="forward_kl")),
    ("f_alpha_divergence_coef", dict(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=NAN)),
    ("f_alpha_divergence_coef", dict(f_alpha_divergence_coef="half")),
    ("chosen_shared_logps", dict(ld_alpha=0.5)),
    ("use_weighting", dict(use_weighting="yes")),
    ("chosen_wpo_weights", dict(use_weighting=True)),
    ("extra_ref_chosen_logps", dict(loss_type="mrpo")),
    ("margin_std", dict(loss_type="alpha_dpo", margin_std=0.0)),
    ("margin_alpha", dict(loss_type="alpha_dpo", margin_alpha=INF)),
    # issue 34: a wrong type names the argument too (not float()'s or list()'s own message)
    ("beta", dict(beta="high")),
    ("beta", dict(beta=None)),
    ("beta", dict(beta=True)),
    ("label_smoothing", dict(label_smoothing=None)),
    ("label_smoothing", dict(label_smoothing="none")),
    ("loss_weights", dict(loss_weights=[None])),
    ("loss_weights", dict(loss_weights="1")),
    ("loss_weights", dict(loss_weights=[1.0, "x"], loss_type=["sigmoid", "nll"])),
    ("loss_type", dict(loss_type=None)),
    ("loss_type", dict(loss_type=3)),
    ("loss_type", dict(loss_type=[None])),
    ("f_alpha_divergence_coef", dict(f_alpha_divergence_coef=None)),
]


@pytest.mark.parametrize("argument, kwargs", BAD_SETTINGS, ids=[f"{a}-{i}" for i, (a, _) in enumerate(BAD_SETTINGS)])
def test_bad_setting_names_the_argument(argument, kwargs):
    batch = make_batch(0)
    kwargs = {"loss_type": "sigmoid", **kwargs}
    with pytest.raises(ValueError, match=argument):
        L.loss(batch["S_c"], batch["S_r"], batch["R_c"], batch["R_r"], chosen_lengths=batch["n_c"],
               rejected_lengths=batch["n_r"], aux_rewards_chosen=batch["a_c"], aux_rewards_rejected=batch["a_r"],
               **kwargs)


def _batch_inputs(batch, *keys):
    return {argument: batch[key] for key, argument in keys}


SHARED = (("S_c_shared", "chosen_shared_logps"), ("S_r_shared", "rejected_shared_logps"))
REF_SHARED = (("R_c_shared", "ref_chosen_shared_logps"), ("R_r_shared", "ref_rejected_shared_logps"))
WPO = (("w_c", "chosen_wpo_weights"), ("w_r", "rejected_wpo_weights"))
EXTRA = (("E_c", "extra_ref_chosen_logps"), ("E_r", "extra_ref_rejected_logps"))

BAD_BATCH_SETTINGS = [
    ("ref_chosen_shared_logps", lambda b: dict(ld_alpha=0.5, **_batch_inputs(b, *SHARED))),
    ("rejected_shared_logps", lambda b: dict(ld_alpha=0.5, chosen_shared_logps=b["S_c_shared"],
                                             **_batch_inputs(b, *REF_SHARED))),
    ("chosen_shared_logps", lambda b: dict(ld_alpha=0.5, **_batch_inputs(b, *SHARED, *REF_SHARED))
     | {"chosen_shared_logps": b["S_c_shared"][:3]}),
    ("chosen_shared_logps", lambda b: _batch_inputs(b, *SHARED)),  # given, but ld_alpha is off
    ("ref_rejected_shared_logps", lambda b: dict(ld_alpha=0.2, **_batch_inputs(b, *SHARED, *REF_SHARED))
     | {"ref_rejected_shared_logps": b["R_r_shared"] * NAN}),
    # the argument's own message, not a later one about a missing input
    ("ld_alpha must lie in", lambda b: dict(ld_alpha=-0.1, **_batch_inputs(b, *SHARED, *REF_SHARED))),
    ("ld_alpha must lie in", lambda b: dict(ld_alpha=1.5, **_batch_inputs(b, *SHARED, *REF_SHARED))),
    ("ld_alpha must be finite", lambda b: dict(ld_alpha=NAN, **_batch_inputs(b, *SHARED, *REF_SHARED))),
    ("ld_alpha must be a number", lambda b: dict(ld_alpha="half", **_batch_inputs(b, *SHARED, *REF_SHARED))),
    ("use_weighting .*'aot'", lambda b: dict(loss_type="aot", use_weighting=True, **_batch_inputs(b, *WPO))),
    ("use_weighting .*'aot_unpaired'", lambda b: dict(loss_type=["sigmoid", "aot_unpaired"], use_weighting=True,
                                                      **_batch_inputs(b, *WPO))),
    ("rejected_wpo_weights", lambda b: dict(use_weighting=True, chosen_wpo_weights=b["w_c"])),
    ("rejected_wpo_weights", lambda b: dict(use_weighting=True, chosen_wpo_weights=b["w_c"],
                                            rejected_wpo_weights=-b["w_r"])),
    ("chosen_wpo_weights", lambda b: _batch_inputs(b, *WPO)),  # given, but use_weighting is off
    ("extra_ref_rejected_logps", lambda b: dict(loss_type="mrpo", extra_ref_chosen_logps=b["E_c"])),
    ("extra_ref_chosen_logps", lambda b: dict(loss_type="mrpo", extra_ref_chosen_logps=b["E_c"][:4],
                                              extra_ref_rejected_logps=b["E_r"])),
    ("extra_ref_chosen_logps", lambda b: dict(loss_type="mrpo", extra_ref_chosen_logps=torch.cat([b["E_c"]] * 2, 1),
                                              extra_ref_rejected_logps=b["E_r"])),
    ("mrpo_weights", lambda b: dict(loss_type="mrpo", extra_ref_chosen_logps=torch.cat([b["E_c"]] * 2, 1),
                                    extra_ref_rejected_logps=torch.cat([b["E_r"]] * 2, 1))),
    ("mrpo_weights", lambda b: dict(loss_type="mrpo", mrpo_weights=[0.5, 0.3, 0.2], **_batch_inputs(b, *EXTRA))),
    ("mrpo_weights", lambda b: dict(loss_type="mrpo", mrpo_weights=[1.0, -0.5], **_batch_inputs(b, *EXTRA))),
    ("mrpo_weights", lambda b: dict(loss_type="mrpo", mrpo_weights=[0.0, 0.0], **_batch_inputs(b, *EXTRA))),
    ("mrpo_eta_mode", lambda b: dict(loss_type="mrpo", mrpo_eta_mode="wide", **_batch_inputs(b, *EXTRA))),
    ("mrpo_eta", lambda b: dict(loss_type="mrpo", mrpo_eta=-0.1, **_batch_inputs(b, *EXTRA))),
    ("ld_alpha", lambda b: dict(loss_type="mrpo", ld_alpha=0.5, **_batch_inputs(b, *EXTRA, *SHARED, *REF_SHARED))),
]


@pytest.mark.parametrize("argument, build", BAD_BATCH_SETTINGS,
                         ids=[f"{a.split()[0]}-{i}" for i, (a, _) in enumerate(BAD_BATCH_SETTINGS)])
def test_bad_batch_option_names_the_argument(argument, build):
    batch = make_batch(0)
    kwargs = {"loss_type": "sigmoid", **build(batch)}
    with pytest.raises(ValueError, match=argument):
        L.loss(batch["S_c"], batch["S_r"], batch["R_c"], batch["R_r"], chosen_lengths=batch["n_c"],
               rejected_lengths=batch["n_r"], **kwargs)


@pytest.mark.parametrize("loss_type", ["ipo", "sppo_hard"])
def test_a_loss_that_overflows_names_the_input_instead_of_returning_inf(loss_type):
    """Issue 34: IPO squares the log-ratio, so a finite log-prob of -1e30 gives 1e60, beyond float32: an error naming
    the term, the pair and the input, never a silent inf; in float64 the same inputs give the finite value."""
    batch = make_batch(RUN_SEED)
    S_c = batch["S_c"].clone()
    S_c[2] = -1e30
    lengths = dict(chosen_lengths=batch["n_c"], rejected_lengths=batch["n_r"])
    with pytest.raises(ValueError, match=rf"non-finite loss .*'{loss_type}' overflows .* pair 2.* policy_chosen_logps"):
        L.loss(S_c, batch["S_r"], batch["R_c"], batch["R_r"], loss_type=loss_type, **lengths)
    out = L.loss(S_c.double(), batch["S_r"].double(), batch["R_c"].double(), batch["R_r"].double(),
                 loss_type=loss_type, **lengths)
    assert math.isfinite(out.loss.item()) and out.loss.item() > 1e50


def test_overflowing_loss_weights_are_named():
    batch = make_batch(RUN_SEED)
    with pytest.raises(ValueError, match="non-finite loss .* loss_weights"):
        L.loss(batch["S_c"], batch["S_r"], batch["R_c"], batch["R_r"], loss_type=["sigmoid", "hinge"],
               loss_weights=[3e38, 3e38])


def test_reference_log_probs_that_require_grad_get_none():
    """Issue 34: the reference is fixed; log-probs computed with grad are detached, the policy's gradient unchanged."""
    batch = make_batch(RUN_SEED)
    S_c, S_r = (batch[key].clone().requires_grad_() for key in ("S_c", "S_r"))
    refs = {key: batch[key].clone().requires_grad_() for key in ("R_c", "R_r", "R_c_shared", "R_r_shared")}
    kwargs = dict(loss_type=["sigmoid", "ipo"], chosen_lengths=batch["n_c"], rejected_lengths=batch["n_r"],
                  ld_alpha=0.5, chosen_shared_logps=batch["S_c_shared"], rejected_shared_logps=batch["S_r_shared"])
    out = L.loss(S_c, S_r, refs["R_c"], refs["R_r"], ref_chosen_shared_logps=refs["R_c_shared"],
                 ref_rejected_shared_logps=refs["R_r_shared"], **kwargs)
    out.loss.backward()
    assert all(ref.grad is None for ref in refs.values())
    fixed = {key: ref.detach() for key, ref in refs.items()}
    S_c2, S_r2 = (batch[key].clone().requires_grad_() for key in ("S_c", "S_r"))
    L.loss(S_c2, S_r2, fixed["R_c"], fixed["R_r"], ref_chosen_shared_logps=fixed["R_c_shared"],
           ref_rejected_shared_logps=fixed["R_r_shared"], **kwargs).loss.backward()
    torch.testing.assert_close(S_c.grad, S_c2.grad, rtol=0, atol=0)

    ref = batch["R_c"].clone().requires_grad_()
    L.unpaired_loss(S_c, ref, [True, False] * 3, kl_policy_logps=batch["S_r"],
                    kl_ref_logps=batch["R_r"]).loss.backward()
    assert ref.grad is None


def test_alpha_dpo_needs_two_pairs_or_given_statistics():
    batch = make_batch(0, batch=1)
    args = (batch["S_c"], batch["S_r"], batch["R_c"], batch["R_r"])
    lengths = dict(chosen_lengths=batch["n_c"], rejected_lengths=batch["n_r"])
    with pytest.raises(ValueError, match="margin_std"):
        L.loss(*args, loss_type="alpha_dpo", **lengths)
    assert torch.isfinite(L.loss(*args, loss_type="alpha_dpo", margin_mean=0.0, margin_std=1.0, **lengths).loss)


def test_f_divergence_error_lists_the_accepted_losses():
    batch = make_batch(0)
    with pytest.raises(ValueError) as error:
        L.loss(batch["S_c"], batch["S_r"], batch["R_c"], batch["R_r"], loss_type="nca_pair",
               f_divergence_type="forward_kl")
    for name in ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft", "nca_pair"):
        assert name in str(error.value)


def test_unknown_loss_message_lists_known_losses():
    batch = make_batch(0)
    with pytest.raises(ValueError) as error:
        L.loss(batch["S_c"], batch["S_r"], batch["R_c"], batch["R_r"], loss_type="dpo")
    for name in ("sigmoid", "ipo", "kto", "upo"):
        assert name in str(error.value)


def test_typo_option_message_points_to_reader():
    batch = make_batch(0)
    with pytest.raises(ValueError, match="read by simpo"):
        L.loss(batch["S_c"], batch["S_r"], batch["R_c"], batch["R_r"], loss_type="sigmoid", gamma=0.5)


# ------------------------------------------------------------------ TRL parity (optional)
@pytest.fixture(scope="module")
def trl_trainers():
    pytest.importorskip("trl")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    try:
        from trl.experimental.cpo import CPOTrainer
        from trl.experimental.orpo import ORPOTrainer
    except ImportError as error:  # older TRL keeps them at the top level
        try:
            from trl import CPOTrainer, ORPOTrainer
        except ImportError:
            pytest.skip(f"TRL CPO/ORPO trainers not importable: {error}")

    return SimpleNamespace(cpo=CPOTrainer, orpo=ORPOTrainer)


def test_simpo_matches_trl_cpo(trl_trainers):
    batch = make_batch(RUN_SEED, torch.float64)
    mean_c, mean_r = batch["S_c"] / batch["n_c"], batch["S_r"] / batch["n_r"]
    for beta, gamma, eps in [(0.1, 0.5, 0.0), (2.0, 1.4, 0.1)]:
        trainer = SimpleNamespace(alpha=0.0, beta=beta, simpo_gamma=gamma, label_smoothing=eps, loss_type="simpo",
                                  accelerator=SimpleNamespace(device=torch.device("cpu")))
        trl_losses, trl_chosen, trl_rejected = trl_trainers.cpo.cpo_loss(trainer, mean_c, mean_r)
        options = {} if gamma == 0.5 else {"gamma": gamma}  # 0.5: our default must equal TRL's
        out, _ = call_loss(batch, "simpo", reference=False, beta=beta, label_smoothing=eps, **options)
        torch.testing.assert_close(out.losses, trl_losses, **F64_TOL)
        assert out.metrics["rewards/chosen"] == pytest.approx(trl_chosen.mean().item())
        assert out.metrics["rewards/rejected"] == pytest.approx(trl_rejected.mean().item())


def test_orpo_matches_trl(trl_trainers):
    batch = make_batch(RUN_SEED, torch.float64)
    mean_c, mean_r = batch["S_c"] / batch["n_c"], batch["S_r"] / batch["n_r"]
    trainer = SimpleNamespace(beta=0.25, accelerator=SimpleNamespace(device=torch.device("cpu")))
    trl_losses, trl_chosen, _, trl_ratio, trl_log_odds = trl_trainers.orpo.odds_ratio_loss(trainer, mean_c, mean_r)
    out, _ = call_loss(batch, "orpo", reference=False, beta=0.25)
    # TRL: loss = nll - mean(beta * logsigmoid(log_odds)); our nll is the per-response token mean.
    expected = (-mean_c).mean() - trl_losses.double().mean()
    float32 = dict(rel=1e-5, abs=1e-6)  # TRL casts the log-probs to float32
    assert out.loss.item() == pytest.approx(expected.item(), **float32)
    assert out.metrics["orpo/log_odds_ratio"] == pytest.approx(trl_ratio.item(), **float32)
    assert out.metrics["orpo/log_odds_chosen"] == pytest.approx(trl_log_odds.item(), **float32)
    assert out.metrics["rewards/chosen"] == pytest.approx(trl_chosen.mean().item(), **float32)


# The DPO family against TRL 1.16's DPOTrainer._compute_loss: tests/test_trl_parity.py.
