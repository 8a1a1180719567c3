"""``upo-frontier``: a micro grid end to end (its JSON field by field, its plot), the relabelling, the pass-through
of upo-train flags, and bad input as one line with exit status 2."""
import json
import math

import pytest
import torch

from helpers import MICRO_MODEL, one_thread  # noqa: F401  (fixture used by pytestmark)
from train_helpers import assert_one_line_error
from upo.frontier.cli import main
from upo.frontier.grid import disagreeing_pairs, relabel
from upo.frontier.measure import HeldOut, attainable_frontier, pair_metrics

pytestmark = pytest.mark.usefixtures("one_thread")
MICRO_TRAIN_ARGS = ["--", "--model-config", json.dumps(MICRO_MODEL), "--batch-size", "4", "--backend", "torch",
                    "--device", "cpu"]
RUN_FIELDS = {"method": str, "base": str, "upo_lambda": (float, type(None)), "relabel_mix": (float, type(None)),
              "preference_accuracy": float, "aux_reward_preferred": float, "aux_reward_generated": (float, type(None)),
              "kl": float}


def micro_grid(tmp_path, *extra, train_args=()):
    argv = ["--output-dir", str(tmp_path / "grid"), "--steps", "2", "--max-examples", "24", "--eval-fraction", "0.25",
            "--bases", "sigmoid", "--lambdas", "0,1", "--mixes", "1", "--no-progress", *extra,
            *MICRO_TRAIN_ARGS, *train_args]
    return main(argv)


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """Three runs (UPO at lambda 0 and 1, relabelling at mix 1), with generation and a UPO-only flag passed through."""
    tmp_path = tmp_path_factory.mktemp("frontier")
    code = micro_grid(tmp_path, "--generate", "2", "--generate-max-tokens", "6", train_args=["--beta-aux", "2.0"])
    assert code == 0
    out = tmp_path / "grid"
    return out, json.loads((out / "frontier.json").read_text())


def test_json_schema_field_by_field(grid):
    _, report = grid
    assert [(r["method"], r["base"], r["upo_lambda"], r["relabel_mix"]) for r in report["runs"]] == [
        ("upo", "sigmoid", 0.0, None), ("upo", "sigmoid", 1.0, None), ("relabel", "sigmoid", None, 1.0)]
    for run in report["runs"]:
        for name, kind in RUN_FIELDS.items():
            assert isinstance(run[name], kind), (name, run[name])
        assert 0.0 <= run["preference_accuracy"] <= 1.0
        assert math.isfinite(run["aux_reward_preferred"]) and math.isfinite(run["kl"])
        assert isinstance(run["aux_reward_generated"], float)  # --generate was given
        # The trainer's own held-out accuracy (rewards/accuracies) counts the same thing.
        assert run["preference_accuracy"] == pytest.approx(run["eval_rewards_accuracies"])
    assert report["steps"] == 2 and report["seed"] == 0
    dataset = report["dataset"]
    assert dataset["eval_pairs"] == 6 and dataset["train_pairs"] == 18
    assert dataset["aux_reward"] == ["readability:1.0"]
    assert report["generate"]["prompts"] == 2 and isinstance(report["generate"]["aux_reward_reference"], float)
    assert report["attainable_frontier"][0]["preference_accuracy"] == 1.0


def test_preferred_reward_lies_between_the_two_sides(grid):
    """The designer reward of the preferred response is a per-pair choice between chosen and rejected."""
    _, report = grid
    low = report["attainable_frontier"][0]["aux_reward_preferred"]  # every chosen response
    high = report["attainable_frontier"][-1]["aux_reward_preferred"]  # the designer's side wherever it differs
    for run in report["runs"]:
        assert low - 1e-9 <= run["aux_reward_preferred"] <= high + 1e-9


def test_plot_and_runs_written(grid):
    out, report = grid
    assert (out / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for run in report["runs"]:
        assert (out / run["output_dir"] / "summary.json").is_file()
    assert (out / "data" / "eval.jsonl").read_text().count("\n") == 6


def test_upo_only_flags_pass_through_to_the_upo_runs_only(grid):
    out, report = grid
    configs = {run["name"]: json.loads((out / run["output_dir"] / "config.json").read_text())
               for run in report["runs"]}
    assert configs["upo-sigmoid-lambda1"]["beta_aux"] == 2.0
    assert configs["upo-sigmoid-lambda1"]["loss_type"] == ["sigmoid", "upo"]
    assert configs["upo-sigmoid-lambda1"]["upo_lambda"] == 1.0
    assert configs["relabel-sigmoid-mix1"]["beta_aux"] == 1.0  # the default: not given to a run without 'upo'
    assert configs["relabel-sigmoid-mix1"]["loss_type"] == ["sigmoid"]
    assert configs["relabel-sigmoid-mix1"]["dataset"].endswith("train-mix1.jsonl")


def test_pair_metrics_on_known_log_probs():
    """Four pairs: the policy ranks chosen first, rejected first, ties, chosen first; index 0 is not held out."""
    logps = {"policy": {"chosen": torch.tensor([0.0, -2.0, -8.0, -3.0, -1.0]),
                        "rejected": torch.tensor([0.0, -6.0, -1.0, -3.0, -9.0]),
                        "chosen_tokens": torch.tensor([1.0, 2.0, 4.0, 1.0, 1.0]),
                        "rejected_tokens": torch.tensor([1.0, 4.0, 2.0, 1.0, 2.0])},
             "reference": {"chosen": torch.tensor([0.0, -4.0, -4.0, -2.0, -1.0]),
                           "rejected": torch.tensor([0.0, -4.0, -4.0, -2.0, -1.0])}}
    # log-ratios S - R: chosen 2, -4, -1, 0; rejected -2, 3, -1, -8 -> margins 4, -7, 0, 8
    held_out = HeldOut(["a", "b", "c", "d"], aux_chosen=[0.1, 0.2, 0.3, 0.9], aux_rejected=[0.5, 0.9, 0.4, 0.1])
    metrics = pair_metrics(logps, [1, 2, 3, 4], held_out)
    assert metrics["preference_accuracy"] == pytest.approx(2 / 4)
    assert metrics["aux_reward_preferred"] == pytest.approx((0.1 + 0.9 + (0.3 + 0.4) / 2 + 0.9) / 4)
    per_token = [2 / 2, -4 / 4, -1 / 1, 0 / 1, -2 / 4, 3 / 2, -1 / 1, -8 / 2]
    assert metrics["kl"] == pytest.approx(sum(per_token) / 8)
    assert metrics["preference_accuracy_agreeing"] == 1.0  # only pair d agrees with the label
    assert metrics["preference_accuracy_disagreeing"] == pytest.approx(1 / 3)
    # per token: chosen 1, -1, -1, 0 vs rejected -0.5, 1.5, -1, -4 -> the same order here
    assert metrics["preference_accuracy_per_token"] == pytest.approx(2 / 4)
    best = attainable_frontier(held_out, points=4)
    assert [p["preference_accuracy"] for p in best] == [1.0, 0.75, 0.5, 0.25]
    gains = [0.7, 0.4, 0.1]  # the disagreeing pairs' gains for the designer, largest first
    assert [p["aux_reward_preferred"] for p in best] == pytest.approx(
        [(1.5 + sum(gains[:k])) / 4 for k in range(4)])


def test_relabelling_swaps_exactly_the_stated_share():
    rows = [{"prompt": str(i), "chosen": f"c{i}", "rejected": f"r{i}"} for i in range(10)]
    aux_chosen = [0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.5]
    aux_rejected = [1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.5, 0.0, 0.5]  # 5 disagree; a tie (row 9) does not
    disagreeing = disagreeing_pairs(aux_chosen, aux_rejected)
    assert disagreeing == [0, 2, 4, 6, 7]
    same, none = relabel(rows, aux_chosen, aux_rejected, 0.0, seed=0)
    assert none == [] and same == rows
    swapped_rows, every = relabel(rows, aux_chosen, aux_rejected, 1.0, seed=0)
    assert every == disagreeing
    for i, row in enumerate(swapped_rows):
        flipped = i in disagreeing
        assert (row["chosen"], row["rejected"]) == ((f"r{i}", f"c{i}") if flipped else (f"c{i}", f"r{i}"))
    assert rows[0]["chosen"] == "c0"  # the input rows are left alone
    _, some = relabel(rows, aux_chosen, aux_rejected, 0.4, seed=0)
    _, more = relabel(rows, aux_chosen, aux_rejected, 0.6, seed=0)
    assert len(some) == 2 and len(more) == 3 and set(some) <= set(more)  # round(m * K), nested


@pytest.mark.parametrize("extra, fragment", [
    (["--methods", "upo,dpo"], "unknown method 'dpo'"),
    # issue 34: an empty list is an error, never a grid that silently lacks that part
    (["--methods", "upo", "--lambdas", ""], "--lambdas is empty: give at least one number"),
    (["--lambdas", ""], "--lambdas is empty: give at least one number"),
    (["--lambdas", ","], "--lambdas is empty"),
    (["--mixes", " , "], "--mixes is empty"),
    (["--methods", "relabel", "--lambdas", ""], "--lambdas is empty"),
    (["--methods", ""], "--methods is empty: give at least one method name"),
    (["--bases", ","], "--bases is empty: give at least one base loss name"),
    (["--lambdas", "0,x"], "--lambdas: 'x' is not a number"),
    (["--lambdas", "0,-1"], "--lambdas: -1 must be a finite number >= 0"),
    (["--lambdas", "nan"], "--lambdas: nan must be a finite number"),
    (["--lambdas", "0,inf"], "--lambdas: inf must be a finite number >= 0"),
    (["--lambdas", "1,1.0"], "--lambdas lists 1.0 more than once"),
    (["--mixes", "0,1.5"], "--mixes: 1.5 must be a finite number in [0, 1]"),
    (["--bases", "nope"], "unknown base loss 'nope'"),
    (["--bases", "simpo"], "base loss 'simpo' uses no reference model"),
    (["--steps", "0"], "--steps must be an integer >= 1"),
    (["--frobnicate"], "unrecognized arguments: --frobnicate"),
])
def test_bad_grid_is_one_line_with_exit_2(tmp_path, capsys, extra, fragment):
    code = micro_grid(tmp_path, *extra)
    assert_one_line_error(code, capsys.readouterr().err, fragment, prog="upo-frontier")
    assert not (tmp_path / "grid" / "frontier.json").exists()


@pytest.mark.parametrize("train_args, fragment", [
    (["--loss-type", "ipo"], "sets loss-type, which upo-frontier sets itself (use upo-frontier's --bases"),
    (["--max-steps", "3"], "use upo-frontier's --steps"),
    (["--beta", "-1"], "--beta must be a finite number > 0"),
    (["--no-such-flag"], "upo-train flags after --: unrecognized arguments: --no-such-flag"),
])
def test_bad_upo_train_flags_are_one_line_before_any_run(tmp_path, capsys, train_args, fragment):
    code = micro_grid(tmp_path, train_args=train_args)
    assert_one_line_error(code, capsys.readouterr().err, fragment, prog="upo-frontier")
    assert not (tmp_path / "grid" / "runs").exists()


def test_results_of_another_grid_are_kept_without_overwrite(tmp_path, capsys):
    (tmp_path / "grid").mkdir()
    (tmp_path / "grid" / "frontier.json").write_text("{}")
    code = micro_grid(tmp_path)
    assert_one_line_error(code, capsys.readouterr().err, "holds the results of another grid", prog="upo-frontier")
