"""UPO's ``beta_aux="auto"`` (the batch's advantage standard deviation, floored) and ``aux_normalize``,
against hand computations on batches small enough to write out."""
import json
import math

import pytest
import torch

import upo
from upo.losses.upo import AUTO_BETA_AUX_FLOOR

S_C, S_R = [-2.0, -3.0], [-4.0, -1.0]
N_C, N_R = [2.0, 4.0], [8.0, 1.0]


def paired(**options):
    return upo.loss(torch.tensor(S_C), torch.tensor(S_R), loss_type="upo", baseline="pair_mean",
                    aux_rewards_chosen=torch.tensor([[1.0], [0.0]]), aux_rewards_rejected=torch.tensor([[0.0], [0.5]]),
                    chosen_lengths=torch.tensor(N_C), rejected_lengths=torch.tensor(N_R), **options)


def hand_loss(advantages, x, beta_aux):
    """mean over pairs of the mean over the pair's two responses of -omega X (omega_max 20 not reached)."""
    terms = [-math.exp(a / beta_aux) * value for a, value in zip(advantages, x)]  # chosen 0, 1, rejected 0, 1
    return ((terms[0] + terms[2]) / 2 + (terms[1] + terms[3]) / 2) / 2


def test_auto_beta_aux_is_the_batch_advantage_std():
    # pair_mean: A = +-(a_c - a_r) / 2 -> chosen 0.5, -0.25; rejected -0.5, 0.25; mean 0, population variance
    # (0.25 + 0.0625 + 0.25 + 0.0625) / 4 = 0.15625.
    advantages = [0.5, -0.25, -0.5, 0.25]
    std = math.sqrt(0.15625)
    out = paired(beta_aux="auto", aux_normalize="sum")
    assert float(out.metrics["aux/beta_aux"]) == pytest.approx(std, rel=1e-6)
    assert out.loss.item() == pytest.approx(hand_loss(advantages, S_C + S_R, std), rel=1e-6)
    # "mean": the same weights on S / n
    out = paired(beta_aux="auto", aux_normalize="mean")
    x = [s / n for s, n in zip(S_C + S_R, N_C + N_R)]
    assert out.loss.item() == pytest.approx(hand_loss(advantages, x, std), rel=1e-6)
    fixed = paired(beta_aux=0.7, aux_normalize="sum")
    assert float(fixed.metrics["aux/beta_aux"]) == pytest.approx(0.7)
    assert fixed.loss.item() == pytest.approx(hand_loss(advantages, S_C + S_R, 0.7), rel=1e-6)


def test_auto_beta_aux_has_a_floor():
    """Equal advantages (std 0): beta_aux is the floor, so A = 0.01 gives omega = exp(0.01 / 0.01) = e."""
    values = torch.full((2,), 0.99)
    out = upo.loss(torch.tensor(S_C), torch.tensor(S_R), loss_type="upo", aux_normalize="sum", beta_aux="auto",
                   aux_rewards_chosen=torch.ones(2, 1), aux_rewards_rejected=torch.ones(2, 1),
                   values_chosen=values, values_rejected=values)
    assert float(out.metrics["aux/beta_aux"]) == pytest.approx(AUTO_BETA_AUX_FLOOR)
    assert float(out.metrics["aux/weight_mean"]) == pytest.approx(math.e, rel=1e-5)


def test_auto_beta_aux_unpaired():
    """Unpaired rows, batch_mean baseline: rewards 1, 0, 0, 3 -> A = 0, -1, -1, 2, population std sqrt(1.5)."""
    logps = torch.tensor([-1.0, -2.0, -3.0, -4.0])
    out = upo.unpaired_loss(logps, desirable=[True, False, True, False], loss_type="upo", beta_aux="auto",
                            aux_normalize="sum", aux_rewards=torch.tensor([[1.0], [0.0], [0.0], [3.0]]))
    std = math.sqrt(1.5)
    expected = sum(-math.exp(a / std) * s for a, s in zip([0.0, -1.0, -1.0, 2.0], logps.tolist())) / 4
    assert float(out.metrics["aux/beta_aux"]) == pytest.approx(std, rel=1e-6)
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("bad", ["Auto", "mean", 0.0, -1.0])
def test_bad_beta_aux_is_refused(bad):
    with pytest.raises(ValueError, match="beta_aux"):
        paired(beta_aux=bad)


# ---- upo-train: --beta-aux auto, --aux-normalize ------------------------------------------------------------
def test_upo_train_logs_the_auto_beta_aux_of_each_step(tmp_path, capsys):
    """With one micro-batch per step the logged beta_aux is that batch's advantage std (both are logged)."""
    from train_helpers import micro_args, run_main

    code, _, err = run_main(micro_args(tmp_path, "--beta-aux", "auto", "--aux-normalize", "sum", "--max-steps", "2"),
                            capsys)
    assert code == 0, err
    lines = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2
    for line in lines:
        assert line["aux/beta_aux"] == pytest.approx(max(line["aux/advantage_std"], AUTO_BETA_AUX_FLOOR), rel=1e-6)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["beta_aux"] == "auto" and config["aux_normalize"] == "sum"


def test_upo_train_passes_aux_normalize_to_the_loss(tmp_path):
    from upo.train.objective import loss_kwargs_from_config
    from train_helpers import micro_config

    assert loss_kwargs_from_config(micro_config(tmp_path), [1.0])["aux_normalize"] == "mean"
    config = micro_config(tmp_path, aux_normalize="sum", beta_aux="auto")
    assert loss_kwargs_from_config(config, [1.0])["aux_normalize"] == "sum"
    assert loss_kwargs_from_config(config, [1.0])["beta_aux"] == "auto"


@pytest.mark.parametrize("flags, fragment", [
    (["--beta-aux", "automatic"], "--beta-aux: invalid number or 'auto': 'automatic'"),
    (["--beta-aux", "-1"], "--beta-aux must be a finite number > 0 or auto"),
    (["--aux-normalize", "max"], "--aux-normalize: invalid choice: 'max'"),
    (["--loss-type", "sigmoid", "--aux-normalize", "sum"], "--aux-normalize only applies with 'upo'"),
])
def test_upo_train_bad_values_are_one_line_errors(tmp_path, capsys, flags, fragment):
    from train_helpers import assert_one_line_error, micro_args, run_main

    code, _, err = run_main(micro_args(tmp_path, *flags), capsys)
    assert_one_line_error(code, err, fragment)


def test_upo_config_takes_auto(tmp_path):
    pytest.importorskip("trl")
    from upo.integrations.trl import UPOConfig
    from upo.integrations.trl.config import plan_loss

    config = UPOConfig(output_dir=str(tmp_path), beta_aux="auto", aux_normalize="sum", loss_type=["sigmoid", "upo"],
                       report_to=[], bf16=False, use_cpu=True)
    kwargs = plan_loss(config, 1).kwargs  # its dry run of upo.fused_loss takes the option
    assert kwargs["beta_aux"] == "auto" and kwargs["aux_normalize"] == "sum"
