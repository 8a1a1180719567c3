"""UPO on an exact bandit (tests/bandit.py): a tabular softmax policy over 8 candidates per prompt, trained
to convergence on the full Bradley-Terry population of preference pairs, where the optimum is known."""
import pytest
import torch

import bandit as B
import upo
from helpers import one_thread  # noqa: F401  (fixture used by pytestmark)

pytestmark = pytest.mark.usefixtures("one_thread")  # 8 x 8 tables: threads only cost

F64 = torch.float64
# Designer rewards that disagree with the preferences (correlation -0.5): there is something to trade.
BANDIT = dict(prompts=8, candidates=8, seed=0, correlation=-0.5)


@pytest.fixture(scope="module")
def bandit():
    return B.make_bandit(**BANDIT)


def test_lambda_zero_gives_dpos_exact_optimum(bandit):
    solved = B.solve(upo, bandit, ["sigmoid", "upo"], upo_lambda=0.0)
    assert solved["grad_norm"] < 1e-8
    torch.testing.assert_close(solved["logp"].exp(), B.dpo_optimum(bandit, 0.1).exp(), rtol=0, atol=1e-7)


@pytest.mark.parametrize("paired, base", [(True, "sigmoid"), (True, "kto"), (False, "kto")])
def test_lambda_zero_adds_nothing_to_the_base_loss(bandit, paired, base):
    """With lambda = 0 the UPO term changes neither the loss nor its gradient, bit for bit, at any policy:
    the optimiser takes the base loss's path to the base loss's optimum."""
    rows = B.paired_rows(bandit) if paired else B.unpaired_rows(bandit)
    losses = B._paired_losses if paired else B._unpaired_losses
    generator = torch.Generator().manual_seed(1)
    kl = dict(kl=0.2) if base == "kto" else {}
    for _ in range(3):
        theta = (bandit.ref_logits + torch.randn(bandit.shape, generator=generator, dtype=F64)).requires_grad_(True)
        grads = []
        for loss_type, options in (([base], {}), ([base, "upo"], dict(upo_lambda=0.0, baseline="batch_mean"))):
            out = losses(upo, bandit, rows, torch.log_softmax(theta, -1), loss_type, **kl, **options)
            (gradient,) = torch.autograd.grad((rows.weight * out.losses).sum(), theta)
            grads.append((out.losses.detach(), gradient))
        assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def _aux_objective(bandit, logp, rows, beta_aux=1.0):
    """L_aux of the policy with the pair-mean baseline (equal lengths): -E_rows[(omega_c S_c + omega_r S_r) / 2]."""
    p, c, r = rows.prompt, rows.first, rows.second
    half = (bandit.aux[p, c] - bandit.aux[p, r]) / 2 / beta_aux
    return float(-(rows.weight * (half.exp() * logp[p, c] + (-half).exp() * logp[p, r]) / 2).sum())


def test_designer_reward_rises_with_lambda(bandit):
    """Over lambda in {0, 0.01, 0.1, 1, 10}: the expected designer reward rises, the expected preference
    utility falls; the auxiliary objective itself falls (what any weighted-sum minimiser guarantees)."""
    rows = B.paired_rows(bandit)
    results = []
    for lam in (0.0, 0.01, 0.1, 1.0, 10.0):
        solved = B.solve(upo, bandit, ["sigmoid", "upo"], upo_lambda=lam, baseline="pair_mean")
        assert solved["grad_norm"] < 1e-6
        results.append((B.measures(bandit, solved["logp"]), _aux_objective(bandit, solved["logp"], rows)))
    designer = [m["aux"] for m, _ in results]
    utility = [m["utility"] for m, _ in results]
    objective = [o for _, o in results]
    assert all(a < b for a, b in zip(designer, designer[1:])), designer
    assert all(a > b for a, b in zip(utility, utility[1:])), utility
    assert all(a > b for a, b in zip(objective, objective[1:])), objective
    assert designer[-1] - designer[0] > 0.5  # lambda buys designer reward ...
    assert results[0][0]["accuracy"] == 1.0 > results[-1][0]["accuracy"]  # ... at the preferences' expense


def test_designer_reward_rises_with_lambda_under_unpaired_kto(bandit):
    designer = []
    for lam in (0.01, 0.03, 0.3):
        solved = B.solve(upo, bandit, ["kto", "upo"], paired=False, upo_lambda=lam, baseline="batch_mean")
        assert solved["grad_norm"] < 1e-6 and solved["kl"] is not None
        designer.append(B.measures(bandit, solved["logp"])["aux"])
    assert all(a < b for a, b in zip(designer, designer[1:])), designer


@pytest.mark.parametrize("paired", [True, False], ids=["paired", "unpaired"])
def test_learned_value_head_centres_the_advantage(bandit, paired):
    """V trained by the library's expectile loss alone: at tau = 0.5 it is each prompt's mean designer
    reward, so the advantage over the data's responses has mean 0; at tau = 0.7 the upper expectile."""
    rows = B.paired_rows(bandit) if paired else B.unpaired_rows(bandit)
    losses = B._paired_losses if paired else B._unpaired_losses
    for tau in (0.5, 0.7):
        values = B.learn_values(upo, bandit, paired, tau)
        expected = torch.tensor([B.expectile(bandit.aux[p], tau) for p in range(bandit.shape[0])], dtype=F64)
        torch.testing.assert_close(values, expected, rtol=0, atol=1e-7)
        out = losses(upo, bandit, rows, torch.log_softmax(bandit.ref_logits, -1), ["upo"], values=values)
        advantage = out.metrics["aux/advantage_mean"]
        if tau == 0.5:
            assert abs(advantage) < 1e-7
        else:
            assert advantage < -0.05  # an upper expectile: most responses below the baseline


def test_the_lambda_benchmark_runs_on_a_small_grid():
    """benchmarks/upo_lambda_bandit.py (whose output docs/upo_lambda.md cites): its pieces on two lambdas."""
    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from benchmarks import upo_lambda_bandit as bench

    small = B.make_bandit(prompts=2, candidates=4, seed=1, correlation=-0.5)
    rows = bench.lambda_grid(small, "dpo", [0.0, 0.1])
    assert rows[0]["kept"] == 1.0 and rows[1]["kept"] < 1.0 and rows[1]["aux"] > rows[0]["aux"]
    assert 1e-5 < bench.lambda_half(small, "dpo", steps=3) < 1e3
