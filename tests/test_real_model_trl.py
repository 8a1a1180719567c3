"""UPOTrainer against TRL 1.16's DPOTrainer on the real model (SmolLM2-135M-Instruct, conversational data through
its chat template, fp32): the same logged losses over 2 steps. ``UPOTrainer`` is given the name ``"smollm2"``
(which DPOTrainer cannot load), DPOTrainer the model ``upo.load_pretrained`` returns; each builds its own
reference as it does by default. Run alone with ``pytest -m real_model``."""
from __future__ import annotations

import pytest

import trl_tiny  # noqa: F401  (offline environment, set before TRL is imported)
from real_model import conversational_rows, require_real_model

trl = pytest.importorskip("trl", reason="TRL is not installed: the parity tests need trl==1.16.0 (the dev extra)")
from trl import DPOConfig, DPOTrainer  # noqa: E402

import upo  # noqa: E402
from upo.integrations.trl import UPOConfig, UPOTrainer  # noqa: E402

LOGGED = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected")


def train(trainer_cls, config_cls, model, processing_class, dataset, tmp_path, **overrides):
    settings = dict(output_dir=str(tmp_path / trainer_cls.__name__), max_steps=2, learning_rate=1e-5,
                    max_length=160, loss_type=["sigmoid"], per_device_train_batch_size=2)
    args = config_cls(**trl_tiny.trainer_args(**(settings | overrides)))
    trainer = trainer_cls(model=model, args=args, train_dataset=dataset, processing_class=processing_class)
    trainer.train()
    return [entry for entry in trainer.state.log_history if "loss" in entry]


@pytest.mark.real_model
@pytest.mark.xdist_group("real_model")
def test_upotrainer_logs_dpotrainers_losses_on_smollm2_with_chat_messages(tmp_path):
    from datasets import Dataset

    require_real_model()
    rows = conversational_rows(4, start=30)
    dataset = Dataset.from_list(rows)
    model, tokenizer = upo.load_pretrained("smollm2")
    theirs = train(DPOTrainer, DPOConfig, model, tokenizer, dataset, tmp_path)
    ours = train(UPOTrainer, UPOConfig, "smollm2", None, dataset, tmp_path)
    assert len(ours) == len(theirs) == 2
    assert abs(theirs[0]["loss"] - 0.693147) < 1e-5  # step 1: the policy is its reference
    assert ours[0]["rewards/chosen"] == ours[0]["rewards/rejected"] == 0.0  # ... through one numerical path
    assert theirs[1]["rewards/margins"] != 0.0  # step 2 has moved: its losses compare trained models
    for step, (a, b) in enumerate(zip(ours, theirs), start=1):
        print(f"step {step}: " + ", ".join(f"{key} {a[key]:.7g} / {b[key]:.7g}" for key in LOGGED))
        assert abs(a["loss"] - b["loss"]) <= 1e-5, (step, a["loss"], b["loss"])
        # the rest to 1e-4 relative: at step 2 they compare two models one Adam step apart, and Adam's first step
        # (about lr * sign(grad)) turns the last-bit differences of near-zero gradients into whole lr-sized moves
        for key in LOGGED[1:]:
            assert abs(a[key] - b[key]) <= 1e-4 * max(1.0, abs(b[key])), (step, key, a[key], b[key])


@pytest.mark.real_model
@pytest.mark.xdist_group("real_model")
def test_upotrainer_in_trls_default_bf16_config_starts_exact_on_smollm2(tmp_path):
    """TRL's DPOConfig sets bf16=True: policy and reference through the same autocast, so step 1 is exact."""
    from datasets import Dataset

    require_real_model()
    assert DPOConfig(str(tmp_path), use_cpu=True).bf16  # TRL's default, which this test keeps
    logs = train(UPOTrainer, UPOConfig, "smollm2", None, Dataset.from_list(conversational_rows(2, start=40)),
                 tmp_path, max_steps=1, bf16=True)
    assert logs[0]["rewards/chosen"] == logs[0]["rewards/rejected"] == 0.0, logs[0]
    assert logs[0]["loss"] == pytest.approx(0.6931471805599453, abs=1e-7)
