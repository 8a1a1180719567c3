"""``UPOConfig(share_prompt=True)``: UPOTrainer runs each pair as one sequence [prompt, chosen, rejected] and logs
and trains exactly as without it (policy, a reference model, LoRA's adapters-off reference, precomputed reference
log-probs, UPO's value head); what cannot share is refused before training."""
from __future__ import annotations

import copy

import pytest

import trl_tiny  # noqa: I001  (sets the offline environment first)

trl = pytest.importorskip("trl")
import torch  # noqa: E402

from upo.integrations.trl import UPOConfig, UPOTrainer  # noqa: E402


def assert_same_runs(shared: trl_tiny.Run, plain: trl_tiny.Run, policy_is_reference: bool = False):
    """``policy_is_reference``: at step 1 (LoRA's B = 0) the accuracy thresholds margins of rounding size."""
    assert len(shared.logs) == len(plain.logs) > 0
    for step, (a, b) in enumerate(zip(shared.logs, plain.logs), start=1):
        assert a.keys() == b.keys()
        for key, value in b.items():
            if policy_is_reference and step == 1 and key == "rewards/accuracies":
                continue
            assert a[key] == pytest.approx(value, rel=1e-5, abs=1e-5), (step, key)
    assert shared.updates.keys() == plain.updates.keys()
    # Per tensor, by norm: AdamW divides by sqrt(v), so an entry whose gradient is near zero turns fp32 rounding
    # of the two summation orders into an update of up to lr (seen: 1.2e-6 on one of 2048 entries).
    for name, update in plain.updates.items():
        gap = float((shared.updates[name] - update).norm())
        assert gap <= 1e-4 * float(update.norm()) + 1e-7, (name, gap, float(update.norm()))


@pytest.mark.parametrize("settings", [
    # another reference initialisation: log-ratios of O(1) from step 1; UPO's value head reads the prompt
    dict(loss_type=["sigmoid", "upo"], ref_seed=1, trainer_kwargs=dict(aux_reward_funcs=["readability"])),
    dict(loss_type=["ipo"], precompute_ref_log_probs=True, ref_seed=1),
    dict(loss_type=["sigmoid"], ld_alpha=0.5, gradient_checkpointing=True, ref_seed=1),
], ids=["sigmoid+upo", "precomputed-reference", "ld-alpha-checkpointing"])
def test_shared_prompt_trains_as_the_unshared_trainer(settings):
    plain = trl_tiny.run(UPOTrainer, UPOConfig, **settings)
    shared = trl_tiny.run(UPOTrainer, UPOConfig, share_prompt=True, **settings)
    assert_same_runs(shared, plain)


def test_shared_prompt_with_lora_and_its_adapters_off_reference():
    from peft import LoraConfig

    def lora():
        return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                          task_type="CAUSAL_LM")

    settings = dict(loss_type=["sigmoid"], ref_model=False, max_steps=2)
    plain = trl_tiny.run(UPOTrainer, UPOConfig, peft_config=lora(), **settings)
    shared = trl_tiny.run(UPOTrainer, UPOConfig, peft_config=lora(), share_prompt=True, **settings)
    assert shared.trainer.ref_model is None
    assert_same_runs(shared, plain, policy_is_reference=True)


def test_padding_free_is_refused():
    with pytest.raises(ValueError, match="share_prompt and padding_free cannot be combined"):
        UPOConfig(**trl_tiny.trainer_args(share_prompt=True, padding_free=True))


def test_attention_without_4d_masks_is_refused():
    tokenizer = trl_tiny.make_tokenizer()
    model = trl_tiny.make_model(tokenizer)
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="the model uses 'flash_attention_2'"):
        UPOTrainer(model=model, ref_model=copy.deepcopy(model), train_dataset=trl_tiny.make_dataset(),
                   args=UPOConfig(**trl_tiny.trainer_args(share_prompt=True, logit_check=False)),
                   processing_class=tokenizer)


def test_shared_prompt_in_trls_default_bf16():
    """TRL's default configuration (``bf16=True``, autocast on CPU): at step 1 the shared policy and reference give
    rewards of exactly 0 and a loss of log 2 (one numerical path for both), and over the run the shared trainer's
    updates and losses are as close to the unshared fp32 run's as the unshared bf16 run's are."""
    settings = dict(loss_type=["sigmoid"], max_steps=3)
    fp32 = trl_tiny.run(UPOTrainer, UPOConfig, bf16=False, **settings)
    plain16 = trl_tiny.run(UPOTrainer, UPOConfig, bf16=True, **settings)
    shared16 = trl_tiny.run(UPOTrainer, UPOConfig, bf16=True, share_prompt=True, **settings)
    first = shared16.logs[0]
    assert first["rewards/chosen"] == 0.0 and first["rewards/rejected"] == 0.0, first
    assert first["loss"] == torch.tensor(2.0).log().item(), first
    ours, baseline = trl_tiny.update_ratio(fp32, shared16), trl_tiny.update_ratio(fp32, plain16)
    assert 0 < ours <= 1.5 * baseline, (ours, baseline)
    loss_gap = max(abs(a["loss"] - b["loss"]) for a, b in zip(shared16.logs, fp32.logs))
    baseline_gap = max(abs(a["loss"] - b["loss"]) for a, b in zip(plain16.logs, fp32.logs))
    assert loss_gap <= 1.5 * baseline_gap + 1e-6, (loss_gap, baseline_gap)
