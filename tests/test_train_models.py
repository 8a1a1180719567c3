"""``upo-train`` on real checkpoints: the log-probs of a saved Granite (logits divided by ``logits_scaling``),
``--model-dtype``, ``--ref-model``, the start-up logit check, and outputs that load back with transformers/peft."""
from __future__ import annotations

import json
import types

import pytest
import torch
import torch.nn.functional as F

from helpers import one_thread  # noqa: F401  (fixture)
from train_helpers import assert_one_line_error, make_trainer, micro_args, run_main
from upo.train.data import ByteTokenizer
from upo.train.data.tokenizer import hf_byte_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = dict(vocab_size=ByteTokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=2, pad_token_id=0, eos_token_id=1, bos_token_id=2,
            tie_word_embeddings=False)


def save_granite(path, seed=0, logits_scaling=4.0, **overrides):
    """A tiny Granite checkpoint with the byte tokenizer, as ``--model`` reads one."""
    from transformers import GraniteConfig, GraniteForCausalLM

    torch.manual_seed(seed)
    model = GraniteForCausalLM(GraniteConfig(**{**TINY, "logits_scaling": logits_scaling, **overrides}))
    with torch.no_grad():
        model.lm_head.weight.mul_(50.0)  # logits of a few nats: the scaling matters (random init: ~0.1)
    model.save_pretrained(path)
    hf_byte_tokenizer().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def granite_dir(tmp_path_factory):
    return save_granite(tmp_path_factory.mktemp("granite") / "model")


def own_sums(model, batch) -> torch.Tensor:
    """Each sequence's summed response log-probs from the model's own logits."""
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()
    logp = logits.log_softmax(-1).gather(-1, batch.labels.clamp(min=0)[..., None])[..., 0]
    return (logp * (batch.labels != -100)).sum(-1)


def first_batch(trainer):
    indices, _ = trainer.sampler.next_batch(trainer.state.position)
    return trainer.make_batch(indices)


def test_granite_trains_on_its_own_logprobs(tmp_path, granite_dir):
    from transformers import AutoModelForCausalLM

    trainer = make_trainer(tmp_path, model=granite_dir, model_config=None, max_steps=1)
    batch = first_batch(trainer)
    expected = own_sums(AutoModelForCausalLM.from_pretrained(granite_dir), batch)
    metrics = trainer.train_step()
    half = expected.shape[0] // 2
    assert metrics["logps/chosen"] == pytest.approx(float(expected[:half].mean()), rel=1e-5)
    assert metrics["logps/rejected"] == pytest.approx(float(expected[half:].mean()), rel=1e-5)
    unscaled = own_sums(AutoModelForCausalLM.from_pretrained(granite_dir, logits_scaling=1.0), batch)
    assert abs(float(unscaled[:half].mean()) - metrics["logps/chosen"]) > 1.0  # what ignoring the scale gives


def test_model_dtype_bf16_holds_bf16_weights(tmp_path, granite_dir):
    trainer = make_trainer(tmp_path, model=granite_dir, model_config=None, model_dtype="bf16", max_steps=1)
    assert {p.dtype for p in trainer.module.policy.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in trainer.module.reference.parameters()} == {torch.bfloat16}
    metrics = trainer.train_step()
    assert metrics is not None and torch.isfinite(torch.tensor(metrics["loss"]))


@pytest.mark.parametrize("pretrained", [True, False])
def test_model_dtype_bf16_keeps_the_fp32_buffers_transformers_keeps(tmp_path, granite_dir, pretrained):
    """bf16 weights as ``from_pretrained(dtype=bf16)`` holds them: RoPE's inverse frequencies stay fp32 (rounded
    to bf16 they move SmolLM2's log-probs by tenths of a nat), for the policy, the reference and the tiny model."""
    model = dict(model=granite_dir, model_config=None) if pretrained else {}
    trainer = make_trainer(tmp_path, model_dtype="bf16", max_steps=1, **model)
    for module in (trainer.module.policy, trainer.module.reference):
        assert {p.dtype for p in module.parameters()} == {torch.bfloat16}
        buffers = {name: b.dtype for name, b in module.named_buffers() if "inv_freq" in name}
        assert buffers and set(buffers.values()) == {torch.float32}, buffers


def test_ref_model_is_the_reference(tmp_path, granite_dir):
    """Another Granite (other weights, another logits_scaling: scored in the policy's fused pass)."""
    from transformers import AutoModelForCausalLM

    ref_dir = save_granite(tmp_path / "ref", seed=1, logits_scaling=2.0)
    trainer = make_trainer(tmp_path, model=granite_dir, model_config=None, ref_model=ref_dir, max_steps=1,
                           loss_type=["sigmoid"])
    batch = first_batch(trainer)
    half = batch.input_ids.shape[0] // 2
    expected = own_sums(AutoModelForCausalLM.from_pretrained(ref_dir), batch)[:half].mean()
    metrics = trainer.train_step()
    reference = metrics["logps/chosen"] - metrics["rewards/chosen"] / trainer.config.beta
    assert reference == pytest.approx(float(expected), rel=1e-4)


def test_ref_model_of_another_width_needs_precompute(tmp_path, capsys, granite_dir):
    ref_dir = save_granite(tmp_path / "ref", hidden_size=64)
    argv = micro_args(tmp_path, "--model", granite_dir, "--ref-model", ref_dir, "--loss-type", "sigmoid")
    code, _, err = run_main(argv, capsys)
    assert_one_line_error(code, err, "--ref-model", "hidden size (64)", "--precompute-ref", alone=False)
    code, _, err = run_main([*argv, "--precompute-ref", "--overwrite"], capsys)
    assert code == 0, err


def _tampered_loader(original):
    """The policy loader, with the LM head's forward doubling the logits (what the head's weight does not say)."""
    def load(config, device):
        model, tokenizer = original(config, device)
        head = model.lm_head
        head.forward = types.MethodType(lambda self, x: 2 * F.linear(x, self.weight, self.bias), head)
        return model, tokenizer
    return load


def test_the_startup_check_stops_a_tampered_model_and_passes_the_default(tmp_path, capsys, monkeypatch):
    import upo.train.trainer as trainer_module

    code, _, err = run_main(micro_args(tmp_path / "plain"), capsys)
    assert code == 0, err
    assert "logit check: llama (LlamaForCausalLM)" in err and "agrees with its own logits" in err
    monkeypatch.setattr(trainer_module, "load_policy_and_tokenizer",
                        _tampered_loader(trainer_module.load_policy_and_tokenizer))
    code, _, err = run_main(micro_args(tmp_path / "tampered"), capsys)
    assert_one_line_error(code, err, "llama (LlamaForCausalLM)", "max |d log p| = ", "--no-logit-check", alone=False)
    code, _, err = run_main(micro_args(tmp_path / "unchecked", "--no-logit-check"), capsys)
    assert code == 0, err


def test_default_model_dir_loads_with_transformers(tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    code, _, err = run_main(micro_args(tmp_path), capsys)
    assert code == 0, err
    model_dir = tmp_path / "out" / "model"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ours = ByteTokenizer()
    for text in ["Plain words.", "  spaces\n\ttabs, ünïcödé 日本 🙂 and <s> literally"]:
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == ours.encode(text)
        assert tokenizer(text)["input_ids"] == ours.encode(text, add_special_tokens=True)
        assert tokenizer.decode(ours.encode(text)) == text
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id) == (0, 1, 2)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    x = torch.tensor([ours.encode("hello", add_special_tokens=True)])
    assert model(input_ids=x).logits.shape == (1, x.shape[1], ours.vocab_size)


@pytest.mark.parametrize("use_model_path", [False, True])
def test_lora_adapters_load_with_peft(tmp_path, capsys, granite_dir, use_model_path):
    from peft import AutoPeftModelForCausalLM

    extra = ["--model", granite_dir] if use_model_path else []
    code, _, err = run_main(micro_args(tmp_path, "--lora", *extra), capsys)
    assert code == 0, err
    model_dir = tmp_path / "out" / "model"
    base = json.loads((model_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base == (granite_dir if use_model_path else str((model_dir / "base").resolve()))
    model = AutoPeftModelForCausalLM.from_pretrained(model_dir)
    x = torch.tensor([ByteTokenizer().encode("hello", add_special_tokens=True)])
    assert torch.isfinite(model(input_ids=x).logits).all()
