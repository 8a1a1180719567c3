"""upo.unpaired_loss and upo.kto_reference_point against float64 formulas written from TRL 1.16's
``KTOTrainer._compute_loss`` and the KTO paper (arXiv 2402.01306): the reference point from
mismatched pairs, unpaired kto (+ upo), paired kto given KL log-probs, the input checks."""
import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

import loss_oracle as oracle
import upo

F64 = torch.float64
TOL = dict(rtol=1e-10, atol=1e-12)


def unpaired_rows(seed, rows=7, columns=2, dtype=F64):
    """N completions of N prompts: log-probs, labels with both classes, lengths, rewards, values, and the KL
    log-probs of the mismatched pairs (x_i, y_{i-1}) that TRL's rotation by one builds."""
    g = torch.Generator().manual_seed(seed)
    logps = -60 * torch.rand(rows, generator=g, dtype=F64) - 1
    ref = logps + 3 * torch.randn(rows, generator=g, dtype=F64)
    desirable = torch.rand(rows, generator=g) < 0.5
    desirable[0], desirable[1] = True, False
    batch = {
        "S": logps, "R": ref, "label": desirable, "n": torch.randint(1, 41, (rows,), generator=g).to(F64),
        "a": torch.randn(rows, columns, generator=g, dtype=F64), "v": torch.randn(rows, generator=g, dtype=F64),
        "kl_S": -60 * torch.rand(rows, generator=g, dtype=F64) - 1,
    }
    batch["kl_R"] = batch["kl_S"] + 2 * torch.randn(rows, generator=g, dtype=F64) + 0.5
    return {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in batch.items()}


def trl_kto(b, beta=0.1, desirable_weight=1.0, undesirable_weight=1.0, kl=None):
    """TRL 1.16 KTOTrainer._compute_loss, loss_type='kto': per-sample losses in the batch's order, the
    batch loss and the metrics, in float64."""
    if kl is None:
        kl = torch.clamp((b["kl_S"] - b["kl_R"]).mean(), min=0)  # one process: gather_for_metrics is the identity
    rho = b["S"] - b["R"]
    chosen = desirable_weight * (1 - oracle.sigmoid(beta * (rho - kl)))
    rejected = undesirable_weight * (1 - oracle.sigmoid(beta * (kl - rho)))
    per_sample = torch.where(b["label"], chosen, rejected)
    label = b["label"]
    rho, kl, logps = rho.detach(), torch.as_tensor(kl, dtype=F64), b["S"].detach()
    metrics = {"kl": float(kl), "rewards/chosen": float((beta * rho[label]).sum() / label.sum()),
               "rewards/rejected": float((beta * rho[~label]).sum() / (~label).sum()),
               "logps/chosen": float(logps[label].sum() / label.sum()),
               "logps/rejected": float(logps[~label].sum() / (~label).sum())}
    metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    # losses.nanmean() over cat(chosen, rejected): the mean over all N samples
    return per_sample, per_sample.mean(), metrics


def call(b, loss_type="kto", with_kl=True, **kwargs):
    S = b["S"].detach().clone().requires_grad_(True)
    if with_kl:
        kwargs.setdefault("kl_policy_logps", b["kl_S"])
        kwargs.setdefault("kl_ref_logps", b["kl_R"])
    kwargs.setdefault("aux_rewards", b["a"] if "upo" in loss_type else None)
    out = upo.unpaired_loss(S, b["R"], b["label"], lengths=b["n"], loss_type=loss_type, **kwargs)
    return out, S


# ------------------------------------------------------------------ the reference point
def test_reference_point_is_the_clamped_mean_over_mismatched_pairs():
    # Prompts x_i and completions y_i; TRL's KL pairs are (x_i, y_{i-1}): log-probs of y_{i-1} given x_i.
    g = torch.Generator().manual_seed(5)
    policy_table = torch.randn(6, 6, generator=g, dtype=F64)  # [prompt, completion] -> log pi(y | x)
    ref_table = torch.randn(6, 6, generator=g, dtype=F64)
    prompts = torch.arange(6)
    completions = torch.roll(prompts, 1)  # y_n, y_1, ..., y_{n-1}
    assert not bool((prompts == completions).any())  # mismatched
    kl_policy, kl_ref = policy_table[prompts, completions], ref_table[prompts, completions]
    expected = max(0.0, sum(float(policy_table[i, (i - 1) % 6] - ref_table[i, (i - 1) % 6]) for i in range(6)) / 6)
    z = upo.kto_reference_point(kl_policy.float().requires_grad_(True), kl_ref.float())
    assert z.ndim == 0 and not z.requires_grad and z.dtype == torch.float32
    assert float(z) == pytest.approx(expected, rel=1e-6, abs=1e-7)
    z64 = upo.kto_reference_point(kl_policy, kl_ref)
    assert z64.dtype == F64 and float(z64) == pytest.approx(expected, rel=1e-12, abs=1e-15)
    # below zero it is clamped to exactly 0
    assert float(upo.kto_reference_point(kl_policy - 100, kl_ref)) == 0.0


def _reference_point_worker(rank, world, port, results):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        sizes = [3, 5]  # different micro-batch sizes: the mean of per-process means, as TRL, not of all values
        values = torch.arange(sizes[rank], dtype=F64) + 10 * rank - 2.0
        z = upo.kto_reference_point(values, torch.zeros_like(values))
        results[rank] = float(z)
    finally:
        dist.destroy_process_group()


def test_reference_point_averages_the_per_process_means():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_reference_point_worker, args=(2, port, results), nprocs=2, join=True)
    means = [(torch.arange(3.0) - 2).mean(), (torch.arange(5.0) + 8).mean()]
    expected = max(0.0, float(sum(means) / 2))
    assert results[0] == results[1] == pytest.approx(expected, rel=1e-12)


# ------------------------------------------------------------------ unpaired kto (+ upo)
@pytest.mark.parametrize("options", [{}, dict(desirable_weight=1.33, undesirable_weight=0.5, beta=0.4),
                                     dict(kl=0.7)])
def test_unpaired_kto_matches_trl(options):
    b = unpaired_rows(1)
    with_kl = "kl" not in options
    out, S = call(b, with_kl=with_kl, **options)
    S64 = b["S"].clone().requires_grad_(True)
    per_sample, loss, metrics = trl_kto({**b, "S": S64}, **options)
    torch.testing.assert_close(out.losses, per_sample.detach(), **TOL)
    torch.testing.assert_close(out.loss, loss.detach(), **TOL)
    assert set(out.metrics) == set(metrics)
    for key, value in metrics.items():
        assert out.metrics[key] == pytest.approx(value, rel=1e-10, abs=1e-12), key
    out.loss.backward()
    loss.backward()
    torch.testing.assert_close(S.grad, S64.grad, **TOL)


def trl_apo_zero_unpaired(b, beta=0.1, desirable_weight=1.0, undesirable_weight=1.0):
    """TRL 1.16 KTOTrainer._compute_loss, loss_type='apo_zero_unpaired' (no KL): per-sample losses, the loss."""
    rho = b["S"] - b["R"]
    chosen = desirable_weight * (1 - oracle.sigmoid(beta * rho))
    rejected = undesirable_weight * oracle.sigmoid(beta * rho)
    per_sample = torch.where(b["label"], chosen, rejected)
    return per_sample, per_sample.mean()


@pytest.mark.parametrize("options", [{}, dict(desirable_weight=1.33, undesirable_weight=0.5, beta=0.4)])
def test_unpaired_apo_zero_matches_trl(options):
    b = unpaired_rows(5)
    out, S = call(b, loss_type="apo_zero_unpaired", with_kl=False, **options)
    S64 = b["S"].clone().requires_grad_(True)
    per_sample, loss = trl_apo_zero_unpaired({**b, "S": S64}, **options)
    torch.testing.assert_close(out.losses, per_sample.detach(), **TOL)
    torch.testing.assert_close(out.loss, loss.detach(), **TOL)
    assert "kl" not in out.metrics and "rewards/margins" in out.metrics
    out.loss.backward()
    loss.backward()
    torch.testing.assert_close(S.grad, S64.grad, **TOL)


def test_unpaired_metrics_leave_out_an_absent_class():
    b = unpaired_rows(2)
    b["label"] = torch.ones_like(b["label"])
    out, _ = call(b)
    assert "rewards/chosen" in out.metrics and "logps/chosen" in out.metrics
    assert not {"rewards/rejected", "logps/rejected", "rewards/margins"} & set(out.metrics)


def test_unpaired_rows_of_a_paired_batch_give_the_paired_loss():
    """A pair is its two responses: unpaired chosen + rejected rows (desirable = chosen) give the paired
    kto + upo loss, with the same reference point and the batch-mean baseline shared by both."""
    g = torch.Generator().manual_seed(3)
    p = oracle.random_batch(g, batch=5, columns=2, dtype=F64)
    kl = 0.3
    paired = upo.loss(p["S_c"], p["S_r"], p["R_c"], p["R_r"], loss_type=["kto", "upo"], loss_weights=[1.0, 0.5],
                      chosen_lengths=p["n_c"], rejected_lengths=p["n_r"], aux_rewards_chosen=p["a_c"],
                      aux_rewards_rejected=p["a_r"], kl=kl, baseline="batch_mean", omega_max=None)
    rows = upo.unpaired_loss(torch.cat([p["S_c"], p["S_r"]]), torch.cat([p["R_c"], p["R_r"]]),
                             [True] * 5 + [False] * 5, lengths=torch.cat([p["n_c"], p["n_r"]]),
                             loss_type=["kto", "upo"], loss_weights=[1.0, 0.5],
                             aux_rewards=torch.cat([p["a_c"], p["a_r"]]), kl=kl, baseline="batch_mean", omega_max=None)
    torch.testing.assert_close(rows.loss, paired.loss, **TOL)
    torch.testing.assert_close((rows.losses[:5] + rows.losses[5:]) / 2, paired.losses, **TOL)
    for key in ("aux/advantage_mean", "aux/advantage_std", "aux/weight_mean", "aux/weight_max", "aux/reward_chosen",
                "aux/reward_rejected", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"):
        assert rows.metrics[key] == pytest.approx(paired.metrics[key], rel=1e-12, abs=1e-12), key


def test_unpaired_upo_per_row_formula_and_value_gradient():
    b = unpaired_rows(4)
    v = b["v"].clone().requires_grad_(True)
    out, S = call(b, ["kto", "upo"], values=v, upo_lambda=0.3, beta_aux=0.5, expectile=0.8, aux_weights=[1.0, -0.5])
    r = b["a"] @ torch.tensor([1.0, -0.5], dtype=F64)
    advantage = r - b["v"]
    omega = torch.clamp(torch.exp(advantage / 0.5), max=20.0)
    u = r - b["v"]
    tau_weight = torch.where(u < 0, torch.tensor(0.2, dtype=F64), torch.tensor(0.8, dtype=F64))
    value = tau_weight * u**2
    kto_rows, _, _ = trl_kto(b)
    torch.testing.assert_close(out.losses, kto_rows + 0.3 * -(omega * b["S"] / b["n"]) + value, **TOL)
    assert out.metrics["aux/advantage_mean"] == pytest.approx(float(advantage.mean()), rel=1e-12)
    assert out.metrics["aux/reward_chosen"] == pytest.approx(float(r[b["label"]].mean()), rel=1e-12)
    out.loss.backward()
    n = len(r)
    torch.testing.assert_close(v.grad, -2 * tau_weight * u / n, **TOL)


# ------------------------------------------------------------------ paired kto with KL log-probs
def test_paired_kto_takes_the_mismatched_pairs_reference_point():
    g = torch.Generator().manual_seed(6)
    p = oracle.random_batch(g, batch=4, dtype=F64)
    kl_S, kl_R = -torch.rand(8, generator=g, dtype=F64) * 30, -torch.rand(8, generator=g, dtype=F64) * 30
    given = upo.loss(p["S_c"], p["S_r"], p["R_c"], p["R_r"], loss_type="kto", kl_policy_logps=kl_S, kl_ref_logps=kl_R)
    z = max(0.0, float((kl_S - kl_R).mean()))
    torch.testing.assert_close(given.losses, oracle.kto_loss(p, 0.1, 0.0, kl=torch.tensor(z, dtype=F64)), **TOL)
    assert given.metrics["kto/kl"] == pytest.approx(z, rel=1e-12, abs=1e-15)
    # without KL log-probs: today's estimate from the batch's own responses
    own = upo.loss(p["S_c"], p["S_r"], p["R_c"], p["R_r"], loss_type="kto")
    torch.testing.assert_close(own.losses, oracle.kto_loss(p, 0.1, 0.0), **TOL)


# ------------------------------------------------------------------ input checks
@pytest.mark.parametrize("fragment, kwargs", [
    ("compares the two responses of a pair", dict(loss_type="sigmoid")),
    ("compares the two responses of a pair", dict(loss_type=["kto", "ipo"])),
    ("needs its reference point", dict(with_kl=False)),
    ("not both", dict(kl=0.1)),
    ("kl_ref_logps of loss 'kto' is missing", dict(with_kl=False, kl_policy_logps=torch.zeros(3, dtype=F64))),
    ("must have the same shape", dict(kl_ref_logps=torch.zeros(2, dtype=F64))),
    ("'value' or 'batch_mean' on unpaired data", dict(loss_type="upo", with_kl=False, baseline="pair_mean")),
    ("values is required by loss 'upo'", dict(loss_type="upo", with_kl=False, baseline="value")),
    ("aux_rewards is required by loss 'upo'", dict(loss_type="upo", with_kl=False, aux=False)),
    ("unknown option(s) 'label_smoothing'", dict(label_smoothing=0.1)),
    ("desirable must hold booleans", dict(desirable=[1, 0, 2, 1, 0, 1, 0])),
    ("desirable must have shape (7,) like policy_logps", dict(desirable=[True, False])),
    ("desirable is required", dict(desirable=None)),
    ("ref_logps is required by loss 'kto'", dict(ref=False)),
    ("policy_logps must be a 1-D tensor [N]", dict(S=torch.zeros(2, 2))),
    ("option omega_max of loss 'upo' must be finite > 0", dict(loss_type="upo", with_kl=False, omega_max=0.0)),
])
def test_bad_unpaired_inputs_name_the_argument(fragment, kwargs):
    b = unpaired_rows(0)
    kwargs = dict(kwargs)
    if kwargs.pop("with_kl", True):
        kwargs.setdefault("kl_policy_logps", b["kl_S"])
        kwargs.setdefault("kl_ref_logps", b["kl_R"])
    desirable = kwargs.pop("desirable", b["label"])
    ref = b["R"] if kwargs.pop("ref", True) else None
    aux = b["a"] if kwargs.pop("aux", True) else None
    S = kwargs.pop("S", b["S"])
    with pytest.raises(ValueError) as err:
        upo.unpaired_loss(S, ref, desirable, lengths=b["n"], aux_rewards=aux, **kwargs)
    assert fragment in str(err.value)


def test_desirable_takes_bools_or_zero_one_numbers():
    b = unpaired_rows(0)
    as_bool, _ = call(b)
    as_ints, _ = call({**b, "label": b["label"].long()})
    as_list, _ = call({**b, "label": [bool(x) for x in b["label"]]})
    assert as_bool.loss.item() == as_ints.loss.item() == as_list.loss.item()
    assert upo.unpaired_losses() == ["apo_zero_unpaired", "kto", "upo"]
    assert math.isfinite(as_bool.loss.item())
