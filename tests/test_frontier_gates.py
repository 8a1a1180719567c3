"""``upo-frontier``'s gates and its one number on planted cases: the trait-rate gate, the positive control (a control
that moves passes, one that does not blocks the comparison), relabelling interpolated at UPO's user reward and KL."""
import math

import pytest

from upo.frontier.compare import compare, interpolate
from upo.frontier.gates import CONTROL_SDS, positive_control_gate, trait_rate_gate


@pytest.mark.parametrize("present, passed", [(10, True), (6, True), (14, True), (5, False), (15, False),
                                             (0, False)])
def test_the_trait_rate_gate_wants_the_trait_in_30_to_70_percent(present, passed):
    scores = [0.5] * present + [0.0] * (20 - present)
    gate = trait_rate_gate(scores, "filler:1.0", 0.3, 0.7)
    assert gate["rate"] == present / 20 and gate["completions"] == 20 and gate["passed"] is passed
    assert ("within" if passed else "outside") in gate["message"]


def test_a_negative_score_is_not_the_trait():
    assert trait_rate_gate([-1.0, -0.5, 0.0, 1.0] * 5, "x:1", 0.3, 0.7)["rate"] == 0.25


def test_too_few_completions_are_not_gated():
    gate = trait_rate_gate([0.0] * 19, "filler:1.0", 0.3, 0.7)  # a rate of 0, but from 19 completions
    assert gate["passed"] is None and "not measured, fewer than 20 completions" in gate["message"]


def run(method, value, seed, aux, user=0.0, kl=1.0, base="sigmoid"):
    return {"method": method, "base": base, "seed": seed, "upo_lambda": value if method == "upo" else None,
            "relabel_mix": value if method == "relabel" else None, "aux_reward_generated": aux,
            "user_reward_generated": user, "kl_generated": kl}


def grid(control: list[float], base_values=(0.50, 0.52, 0.51), upo=(0.60, 0.61, 0.59), base="sigmoid"):
    """The base loss (UPO at lambda 0), relabelling at m = 0.5 and 1, UPO at lambda 3, three seeds. Relabelling's
    three points of a seed lie on the plane aux = 0.5 + 2 user - 0.1 (kl - 1); UPO is at (user -0.05, kl 1.5)."""
    runs = []
    for seed in range(3):
        runs.append(run("upo", 0.0, seed, base_values[seed], user=(base_values[seed] - 0.5) / 2, base=base))
        runs.append(run("relabel", 0.5, seed, 0.5 + 2 * -0.02 - 0.1 * 0.0, user=-0.02, kl=1.0, base=base))
        runs.append(run("relabel", 1.0, seed, control[seed], user=(control[seed] - 0.5 + 0.1 * 1.0) / 2, kl=2.0,
                        base=base))
        runs.append(run("upo", 3.0, seed, upo[seed], user=-0.05, kl=1.5, base=base))
    return runs


def test_a_control_that_moves_passes():
    gate = positive_control_gate(grid([0.70, 0.74, 0.66]), "sigmoid")
    base_sd, control_sd = 0.01, 0.04  # sample sds of (0.50, 0.52, 0.51) and (0.70, 0.74, 0.66)
    pooled = math.sqrt((base_sd ** 2 + control_sd ** 2) / 2)
    assert gate["shift"] == pytest.approx(0.70 - 0.51) and gate["seed_sd"] == pytest.approx(pooled)
    assert gate["passed"] and gate["seeds"] == [0, 1, 2] and gate["threshold"] == pytest.approx(CONTROL_SDS * pooled)


def test_a_control_within_the_seed_noise_fails_and_blocks_the_comparison():
    runs = grid([0.52, 0.54, 0.51])  # shift 0.0133 < 3 x 0.0117
    gate = positive_control_gate(runs, "sigmoid")
    assert not gate["passed"] and gate["shift"] == pytest.approx(0.52333333 - 0.51)
    result = compare(runs, ["sigmoid"])
    assert result["upo_minus_relabelling"] is None and result["per_lambda"] == []
    assert result["verdict"].startswith("the experiment cannot detect an effect")


def test_a_control_that_moves_the_wrong_way_fails():
    assert not positive_control_gate(grid([0.30, 0.31, 0.29]), "sigmoid")["passed"]


def test_one_seed_or_no_control_run_is_not_measured():
    one_seed = [r for r in grid([0.7, 0.7, 0.7]) if r["seed"] == 0]
    no_control = [r for r in grid([0.7, 0.7, 0.7]) if r["relabel_mix"] != 1.0]
    for runs in (one_seed, no_control):
        gate = positive_control_gate(runs, "sigmoid")
        assert not gate["passed"] and "not measured" in gate["message"]


def test_the_one_number_is_upo_minus_relabelling_on_its_plane():
    runs = grid([0.70, 0.71, 0.69])
    # relabelling's plane at UPO's point (user -0.05, kl 1.5): 0.5 - 0.1 - 0.05 = 0.35
    result = compare(runs, ["sigmoid"])
    expected = [0.60 - 0.35, 0.61 - 0.35, 0.59 - 0.35]
    number = result["upo_minus_relabelling"]
    assert number["per_seed"] == pytest.approx(expected) and number["mean"] == pytest.approx(0.25)
    assert number["std"] == pytest.approx(0.01) and (number["min"], number["max"]) == pytest.approx((0.24, 0.26))
    assert [(e["base"], e["upo_lambda"]) for e in result["per_lambda"]] == [("sigmoid", 3.0)]
    assert "+0.2500" in result["verdict"]


def test_only_the_bases_that_passed_enter_the_number():
    runs = grid([0.70, 0.71, 0.69]) + grid([0.50, 0.52, 0.51], upo=(0.9, 0.9, 0.9), base="kto")
    result = compare(runs, ["sigmoid", "kto"])
    assert result["positive_control"]["sigmoid"]["passed"] and not result["positive_control"]["kto"]["passed"]
    assert result["upo_minus_relabelling"]["bases"] == ["sigmoid"]
    assert result["upo_minus_relabelling"]["mean"] == pytest.approx(0.25)


def test_interpolation_through_three_points_and_along_a_flat_coordinate():
    plane = [(u, k, 1 + 2 * u - 0.5 * k) for u, k in ((0.0, 0.0), (1.0, 0.0), (0.0, 2.0))]
    assert interpolate(plane, 0.5, 1.0) == pytest.approx(1.5)
    assert interpolate(plane, 3.0, -1.0) == pytest.approx(7.5)  # linear beyond the points
    flat_user = [(0.0, k, 2 * k) for k in (1.0, 2.0, 4.0)]  # every point at user 0: the line in kl
    assert interpolate(flat_user, 5.0, 3.0) == pytest.approx(6.0)
    assert interpolate([(0.0, 1.0, 0.7), (0.0, 1.0, 0.9)], 0.3, 8.0) == pytest.approx(0.8)  # no spread: the mean
