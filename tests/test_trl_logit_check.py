"""``UPOTrainer`` reads models through ``upo.heads``: a Granite (logits / logits_scaling) logs TRL's own
log-probs, and the start-up check refuses a tampered head unless ``UPOConfig(logit_check=False)``."""
from __future__ import annotations

import copy
import types

import pytest

import trl_tiny  # noqa: I001  (sets the offline environment first)

trl = pytest.importorskip("trl")
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

from upo.heads import LogitCheckError  # noqa: E402
from upo.integrations.trl import UPOConfig, UPOTrainer  # noqa: E402


def granite(tokenizer):
    from transformers import GraniteConfig, GraniteForCausalLM

    torch.manual_seed(0)
    model = GraniteForCausalLM(GraniteConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None, logits_scaling=4.0))
    with torch.no_grad():
        model.lm_head.weight.mul_(50.0)  # logits of a few nats: the scaling matters
    return model


def first_logs(trainer_cls, config_cls, model, tokenizer):
    args = config_cls(**trl_tiny.trainer_args(max_steps=1, loss_type=["sigmoid"]))
    trainer = trainer_cls(model=model, ref_model=copy.deepcopy(model), args=args, train_dataset=trl_tiny.make_dataset(),
                          processing_class=tokenizer)
    trainer.train()
    return next(h for h in trainer.state.log_history if "loss" in h)


def test_granite_logprobs_equal_dpo_trainer():
    tokenizer = trl_tiny.make_tokenizer()
    theirs = first_logs(DPOTrainer, DPOConfig, granite(tokenizer), tokenizer)
    ours = first_logs(UPOTrainer, UPOConfig, granite(tokenizer), tokenizer)
    for key in ("logps/chosen", "logps/rejected", "loss"):
        assert ours[key] == pytest.approx(theirs[key], rel=1e-5), key


def test_a_tampered_head_is_refused_unless_the_check_is_off():
    tokenizer = trl_tiny.make_tokenizer()

    def tampered():
        model = trl_tiny.make_model(tokenizer)
        head = model.lm_head
        head.forward = types.MethodType(lambda self, x: 2 * F.linear(x, self.weight, self.bias), head)
        return model

    def construct(**overrides):
        args = UPOConfig(**trl_tiny.trainer_args(loss_type=["sigmoid"], **overrides))
        model = tampered()
        return UPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args, train_dataset=trl_tiny.make_dataset(),
                          processing_class=tokenizer)

    with pytest.raises(LogitCheckError) as refused:
        construct()
    message = str(refused.value)
    assert "llama (LlamaForCausalLM)" in message and "max |d log p| = " in message
    assert "UPOConfig(logit_check=False)" in message
    construct(logit_check=False)
