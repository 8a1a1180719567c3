"""UPOTrainer in TRL's default configuration, ``bf16=True`` (docs/trl.md, "Mixed precision").

At step 1 the policy is the reference: every implicit reward is exactly 0 and the sigmoid loss is log 2,
as DPOTrainer logs it, whether the reference is a copy, the policy with LoRA's adapters off or precomputed.
Over 3 steps, upo's bf16 run is no further from the fp32 run than TRL's own bf16 run is from its fp32 run:
the logged losses and the parameter updates.
"""
from __future__ import annotations

import functools
import math

import pytest

import trl_tiny  # noqa: I001  (sets the offline environment first)

trl = pytest.importorskip("trl")
import torch  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

from upo.integrations.trl import UPOConfig, UPOTrainer  # noqa: E402

LOG_2 = torch.tensor(math.log(2)).item()
TRAINERS = {"upo": (UPOTrainer, UPOConfig), "trl": (DPOTrainer, DPOConfig)}


@functools.lru_cache(maxsize=None)
def sigmoid_run(trainer: str, bf16: bool) -> trl_tiny.Run:
    return trl_tiny.run(*TRAINERS[trainer], loss_type=["sigmoid"], bf16=bf16)


def assert_exact_first_step(log: dict):
    assert log["rewards/chosen"] == 0.0 and log["rewards/rejected"] == 0.0, log
    assert log["loss"] == LOG_2, log


def test_trl_default_config_is_bf16():  # what these tests are about: every user who does not say otherwise
    assert DPOConfig("/tmp/upo-trl-tests", use_cpu=True).bf16 and UPOConfig("/tmp/upo-trl-tests", use_cpu=True).bf16


def lora_config():
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, task_type="CAUSAL_LM")


CASES = {"copy": {}, "precomputed": dict(precompute_ref_log_probs=True),
         "lora": dict(ref_model=False, peft_config="lora"), "ipo": dict(loss_type=["ipo"]),
         "sigmoid+sft": dict(loss_type=["sigmoid", "sft"])}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_first_step_is_exact_in_bf16(case):
    case = dict(case)
    if case.get("peft_config") == "lora":
        pytest.importorskip("peft")
        case["peft_config"] = lora_config()
    settings = dict(loss_type=["sigmoid"], bf16=True, max_steps=1)
    settings.update(case)
    run = trl_tiny.run(UPOTrainer, UPOConfig, **settings)
    log = run.logs[0]
    assert log["rewards/chosen"] == 0.0 and log["rewards/rejected"] == 0.0, log
    if settings["loss_type"] == ["sigmoid"]:
        assert log["loss"] == LOG_2, log


def test_bf16_run_is_as_close_to_fp32_as_trls_own():
    upo16, trl16, trl32 = sigmoid_run("upo", True), sigmoid_run("trl", True), sigmoid_run("trl", False)
    assert_exact_first_step(upo16.logs[0])
    assert abs(upo16.logs[0]["loss"] - trl16.logs[0]["loss"]) <= 1e-6
    ours, theirs = trl_tiny.update_ratio(trl32, upo16), trl_tiny.update_ratio(trl32, trl16)
    print(f"\nbf16 update distance from the fp32 update: upo {ours:.3g}, TRL {theirs:.3g}")
    assert 0 < ours <= 1.5 * theirs, (ours, theirs)
    loss_gap = max(abs(a["loss"] - b["loss"]) for a, b in zip(upo16.logs, trl32.logs))
    trl_gap = max(abs(a["loss"] - b["loss"]) for a, b in zip(trl16.logs, trl32.logs))
    assert loss_gap <= 1.5 * trl_gap, (loss_gap, trl_gap)
