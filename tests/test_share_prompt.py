"""Prompt sharing (``--share-prompt``, upo/shared_prompt.py): each pair as ONE sequence [prompt, chosen, rejected]
gives the unshared per-token log-probs, losses and gradients; the rejected response never sees the chosen one;
what cannot share is refused in one line."""
import json

from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import upo_kernels
from helpers import MICRO_MODEL, one_thread  # noqa: F401  (fixture used by pytestmark)
from train_helpers import TIMING_KEYS, assert_one_line_error, make_trainer, micro_args, run_main, train_steps
from upo import shared_prompt
from upo.heads import describe_lm_head
from upo.shared_prompt import (SharedPromptRows, block_attention, install_block_attention, prompt_lengths_of,
                               share_prompt_rows, shared_hidden_states)
from upo.train.data import collate
from upo.train.errors import UserError
from upo.train.evaluation import evaluate_pairs
from upo.train.model_checks import check_attention
from upo.train.models import tiny_llama_config
from upo_kernels.prefix_attention import prefix_causal_attention

pytestmark = pytest.mark.usefixtures("one_thread")
TOL = dict(rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ the layout, by hand
def test_layout_mask_positions_and_gather_by_hand():
    # pair 0: prompt [1 2 3], chosen [4 5], rejected [6]; pair 1: prompt [7], chosen [8], rejected [9 10 11]
    ids = torch.tensor([[1, 2, 3, 4, 5], [7, 8, 0, 0, 0], [1, 2, 3, 6, 0], [7, 9, 10, 11, 0]])
    rows = share_prompt_rows(ids, torch.tensor([5, 2, 4, 4]), torch.tensor([3, 1]), pad_id=0)
    assert rows.input_ids.tolist() == [[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 0]]
    # rejected continues from the prompt's end: position 3 (pair 0), 1 2 3 (pair 1)
    assert rows.position_ids.tolist() == [[0, 1, 2, 3, 4, 3], [0, 1, 1, 2, 3, 0]]
    seen = [[[k for k in range(6) if rows.allowed[i, 0, q, k]] for q in range(6)] for i in range(2)]
    assert seen[0] == [[0], [0, 1], [0, 1, 2], [0, 1, 2, 3], [0, 1, 2, 3, 4], [0, 1, 2, 5]]
    assert seen[1] == [[0], [0, 1], [0, 2], [0, 2, 3], [0, 2, 3, 4], [5]]  # the padding sees only itself
    # unshared row position -> flat shared position (padding -> the pair's first token)
    assert rows.source.tolist() == [[0, 1, 2, 3, 4], [6, 7, 6, 6, 6], [0, 1, 2, 5, 0], [6, 8, 9, 10, 6]]
    assert rows.num_tokens == 11


def test_a_pair_whose_rows_differ_in_the_prompt_is_refused():
    ids = torch.tensor([[1, 2, 4], [1, 3, 5]])
    with pytest.raises(ValueError, match="same 2-token prompt"):
        share_prompt_rows(ids, torch.tensor([3, 3]), torch.tensor([2]), pad_id=0)


def test_prompt_lengths_from_a_completion_mask():
    completion = torch.tensor([[0, 0, 1, 1], [0, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]])
    attention = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 0]])
    assert prompt_lengths_of(completion, attention).tolist() == [2, 3]  # row 1: no completion, all prompt


# ------------------------------------------------------------------ against the model's own log-probs
GROUPED_HEADS = {"num_attention_heads": 4, "num_key_value_heads": 2}  # grouped-query attention, as SmolLM2's


def micro_model(attn: str, seed: int = 0, **config):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_llama_config({**MICRO_MODEL, **config}), attn_implementation=attn)


def random_pairs(seed: int, pairs: int = 3):
    """Right-padded unshared rows of pairs with odd, unequal lengths: ``ids`` [2B, T], lengths, prompt lengths."""
    g = torch.Generator().manual_seed(seed)
    spans = [[int(n) for n in torch.randint(1, 9, (3,), generator=g)] for _ in range(pairs)]
    seqs, prompts = [], []
    for prompt, chosen, rejected in spans:
        p = torch.randint(3, 200, (prompt,), generator=g).tolist()
        seqs.append((p, torch.randint(3, 200, (chosen,), generator=g).tolist(),
                     torch.randint(3, 200, (rejected,), generator=g).tolist()))
        prompts.append(prompt)
    rows = [p + c for p, c, _ in seqs] + [p + r for p, _, r in seqs]
    ids = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row)
    lengths = torch.tensor([len(row) for row in rows])
    labels = torch.full_like(ids, -100)  # position t predicts the response token t + 1
    for i, row in enumerate(rows):
        start = prompts[i % pairs]
        labels[i, start - 1:len(row) - 1] = ids[i, start:len(row)]
    return ids, lengths, torch.tensor(prompts), labels


def own_logprobs(model, ids, lengths, labels):
    """The model's own ``log_softmax(logits)`` of the labels on the unshared rows (0 where unlabelled)."""
    mask = (torch.arange(ids.shape[1])[None] < lengths[:, None]).long()
    logits = model(input_ids=ids, attention_mask=mask).logits.float()
    picked = logits.log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    return picked.masked_fill(labels == -100, 0.0)


def shared_logprobs(model, rows, labels):
    head = describe_lm_head(model)
    hidden = shared_hidden_states(head, model, rows)
    weight, _ = head.weight_and_bias(hidden.dtype)
    return upo_kernels.linear_logprobs(hidden, weight, labels), hidden


@pytest.mark.parametrize("heads", [{}, GROUPED_HEADS], ids=["mha", "gqa"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_per_token_logprobs_and_their_gradients_equal_the_unshared_rows(attn, seed, heads):
    model = micro_model(attn, seed, **heads)
    ids, lengths, prompts, labels = random_pairs(seed)
    rows = share_prompt_rows(ids, lengths, prompts, pad_id=0)
    upstream = torch.randn(labels.shape, generator=torch.Generator().manual_seed(seed))
    expected = own_logprobs(model, ids, lengths, labels)
    expected_grads = torch.autograd.grad((expected * upstream).sum(), list(model.parameters()))
    got, _ = shared_logprobs(model, rows, labels)
    got = got.masked_fill(labels == -100, 0.0)
    torch.testing.assert_close(got, expected, **TOL)
    got_grads = torch.autograd.grad((got * upstream).sum(), list(model.parameters()))
    for (name, _), g, e in zip(model.named_parameters(), got_grads, expected_grads):
        torch.testing.assert_close(g, e, **TOL, msg=name)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_under_bf16_autocast_no_farther_from_fp32_than_the_models_own(attn):
    """--precision bf16 and TRL's default bf16=True run the model under autocast (rotated queries fp32 beside bf16
    values): the shared rows' log-probs and gradients are no farther from the fp32 model's own than the model's own
    under autocast are."""
    seed = 3
    model = micro_model(attn, seed, **GROUPED_HEADS)
    ids, lengths, prompts, labels = random_pairs(seed)
    rows = share_prompt_rows(ids, lengths, prompts, pad_id=0)
    params = list(model.parameters())
    exact = own_logprobs(model, ids, lengths, labels)
    exact_grads = torch.autograd.grad(exact.sum(), params)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        own = own_logprobs(model, ids, lengths, labels)
        shared, _ = shared_logprobs(model, rows, labels)
    shared = shared.float().masked_fill(labels == -100, 0.0)
    errors = {}
    for name, values in (("own", own), ("shared", shared)):
        grads = torch.autograd.grad(values.sum(), params)
        errors[name] = [float((values - exact).abs().max())] + [
            float((g - e).norm() / e.norm()) for g, e in zip(grads, exact_grads) if e.norm() > 0]
    assert max(errors["own"]) > 0  # autocast did round
    for got, baseline in zip(errors["shared"], errors["own"]):
        assert got <= 1.25 * baseline + 1e-3, (errors["shared"], errors["own"])


def test_first_rejected_token_is_predicted_from_the_prompts_last_hidden_state():
    """In the shared row the token before the first rejected token is the last CHOSEN token; the shift must
    not read that position (it would give a different number)."""
    model = micro_model("sdpa")
    ids, lengths, prompts, labels = random_pairs(3, pairs=2)
    rows = share_prompt_rows(ids, lengths, prompts, pad_id=0)
    expected = own_logprobs(model, ids, lengths, labels)
    got, hidden = shared_logprobs(model, rows, labels)
    head = describe_lm_head(model)
    full = head.hidden_states(model, rows.input_ids, rows.attention_mask(), rows.position_ids)
    weight, _ = head.weight_and_bias(full.dtype)
    for i in range(2):
        prompt, first = int(prompts[i]), 2 + i  # row 2 + i: pair i's rejected row
        chosen = int(lengths[i]) - prompt
        assert torch.allclose(got[first, prompt - 1], expected[first, prompt - 1], **TOL)
        naive = upo_kernels.linear_logprobs(full[i, prompt + chosen - 1][None], weight, labels[first, prompt - 1][None])
        assert not torch.allclose(naive[0], expected[first, prompt - 1], rtol=1e-3, atol=1e-3)


def test_rejected_log_probs_do_not_depend_on_the_chosen_response():
    """The mask's point: change every chosen token and the rejected response's values stay bit-for-bit."""
    model = micro_model("sdpa")
    ids, lengths, prompts, labels = random_pairs(4)
    pairs = len(prompts)
    altered = ids.clone()
    for i in range(pairs):
        altered[i, prompts[i]:lengths[i]] = (altered[i, prompts[i]:lengths[i]] + 7) % 200 + 3
    with torch.no_grad():
        before, _ = shared_logprobs(model, share_prompt_rows(ids, lengths, prompts, 0), labels)
        after, _ = shared_logprobs(model, share_prompt_rows(altered, lengths, prompts, 0), labels)
    assert torch.equal(before[pairs:], after[pairs:])
    assert not torch.equal(before[:pairs], after[:pairs])  # the chosen rows did change


def test_sdpa_runs_by_block_without_a_dense_mask(monkeypatch):
    """Under SDPA no [S, S] mask is built or passed: [prompt, chosen] runs on SDPA's causal kernels, the rejected
    response over the prompt and itself by prefix_causal_attention (on CPU two flash kernels and no mask at all; a
    dense mask would make SDPA score every pair of the row)."""
    model = micro_model("sdpa")
    ids, lengths, prompts, labels = random_pairs(5)
    rows = share_prompt_rows(ids, lengths, prompts, pad_id=0)
    describe_lm_head(model)  # its probe of the model runs before the recording
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recorded(q, k, v, attn_mask=None, is_causal=False, **kwargs):
        calls.append(("sdpa", q.shape[2], k.shape[2], None if attn_mask is None else tuple(attn_mask.shape), is_causal))
        return sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kwargs)

    def prefix_attention_recorded(q, prefix_key, prefix_value, key, value, **kwargs):
        calls.append(("prefix", q.shape[2], prefix_key.shape[2], key.shape[2]))
        return prefix_causal_attention(q, prefix_key, prefix_value, key, value, **kwargs)

    masks = []

    def block_attention_recording_its_mask(module, query, key, value, attention_mask, **kwargs):
        masks.append(attention_mask)  # what transformers built for the layer (block_attention ignores it)
        return block_attention(module, query, key, value, attention_mask, **kwargs)

    install_block_attention()
    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS, "sdpa", block_attention_recording_its_mask)
    monkeypatch.setattr(shared_prompt, "install_block_attention", lambda: None)
    monkeypatch.setattr(shared_prompt, "prefix_causal_attention", prefix_attention_recorded)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recorded)
    monkeypatch.setattr(SharedPromptRows, "attention_mask", lambda *a, **k: pytest.fail("dense mask built"))
    monkeypatch.setattr(SharedPromptRows, "allowed", property(lambda self: pytest.fail("dense mask built")))
    shared_logprobs(model, rows, labels)
    layers = MICRO_MODEL["num_hidden_layers"]
    expected = []
    for prompt, chosen, rejected in rows.spans:
        expected += [("sdpa", prompt + chosen, prompt + chosen, None, True), ("prefix", rejected, prompt, rejected)]
    assert calls == expected * layers  # no masked SDPA call: the CPU path of prefix_causal_attention takes none
    assert masks == [None] * layers  # transformers built no [S, S] mask either


# ------------------------------------------------------------------ upo-train: loss, gradients, every path
def loss_and_grads(trainer, share_prompt: bool):
    trainer.module.zero_grad(set_to_none=True)
    examples = [trainer.data.examples[i] for i in trainer.train_indices[:4]]
    batch = collate(examples, trainer.pad_id, packing=False, share_prompt=share_prompt)
    out = trainer.module(batch)
    out.loss.backward()
    return out, {name: p.grad.clone() for name, p in trainer.module.named_parameters() if p.grad is not None}


def test_loss_terms_and_gradients_equal_the_unshared_batch_with_truncation(tmp_path):
    """sigmoid + upo with the value head (the prompt's last hidden state), prompts and responses truncated."""
    trainer = make_trainer(tmp_path, max_length=48, max_prompt_length=20)
    assert any(len(e.prompt_ids) == 20 for e in trainer.data.examples)  # prompts were cut
    train_steps(trainer, 2)  # away from the initial point, where policy == reference
    plain, plain_grads = loss_and_grads(trainer, share_prompt=False)
    shared, shared_grads = loss_and_grads(trainer, share_prompt=True)
    torch.testing.assert_close(shared.loss, plain.loss, **TOL)
    for name in plain.terms:
        torch.testing.assert_close(shared.terms[name], plain.terms[name], **TOL, msg=name)
    assert shared_grads.keys() == plain_grads.keys() and any("value_head" in name for name in plain_grads)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(shared_grads[name], grad, **TOL, msg=name)


def assert_same_metrics(shared: list[dict], plain: list[dict]):
    for step, (a, b) in enumerate(zip(shared, plain), start=1):
        for key in b.keys() - TIMING_KEYS:
            # at step 1 policy == reference: the accuracy thresholds margins of rounding size
            if step == 1 and key == "rewards/accuracies":
                continue
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-5), (step, key)


@pytest.mark.parametrize("settings", [
    {},
    {"lora": True, "lora_r": 4, "loss_type": ["sigmoid"], "lr": 1e-2},  # reference: the adapters off
    {"precompute_ref": True},  # the cache computed in the shared rows training runs
    {"loss_type": ["kto", "upo"]},  # KTO's mismatched rows stay unshared beside the shared pairs
    {"gradient_checkpointing": True, "loss_type": ["ipo"], "ld_alpha": 0.5},
], ids=["default", "lora", "precompute-ref", "kto-mismatched", "checkpointing-ld-dpo"])
def test_training_steps_equal_the_unshared_run(tmp_path, settings):
    shared = make_trainer(tmp_path / "shared", share_prompt=True, **settings)
    plain = make_trainer(tmp_path / "plain", **settings)
    assert_same_metrics(train_steps(shared, 2), train_steps(plain, 2))
    for (name, a), (_, b) in zip(shared.module.named_parameters(), plain.module.named_parameters()):
        torch.testing.assert_close(a, b, **TOL, msg=name)


def test_evaluation_equals_the_unshared_run(tmp_path):
    shared = make_trainer(tmp_path / "shared", share_prompt=True, eval_fraction=0.25)
    plain = make_trainer(tmp_path / "plain", eval_fraction=0.25)
    train_steps(shared, 1), train_steps(plain, 1)
    a, b = evaluate_pairs(shared, shared.eval_indices), evaluate_pairs(plain, plain.eval_indices)
    assert a.keys() == b.keys() and "aux/implicit_reward_corr" in a
    for key in b:
        assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-5), key


# ------------------------------------------------------------------ the command line
def read_metrics(tmp_path):
    return [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]


def test_cli_share_prompt_logs_the_unshared_runs_metrics(tmp_path, capsys):
    code, _, err = run_main(micro_args(tmp_path / "shared", "--share-prompt", "--max-steps", "2"), capsys)
    assert code == 0, err
    code, _, err = run_main(micro_args(tmp_path / "plain", "--max-steps", "2"), capsys)
    assert code == 0, err
    shared, plain = read_metrics(tmp_path / "shared"), read_metrics(tmp_path / "plain")
    assert len(shared) == len(plain) == 2
    assert_same_metrics(shared, plain)


def test_config_file_takes_share_prompt(tmp_path, capsys):
    from upo.train.cli import build_parser
    from upo.train.config_file import load_config_file

    path = tmp_path / "run.yaml"
    path.write_text("share_prompt: true\n")
    settings, _ = load_config_file(str(path), build_parser())
    assert settings["share_prompt"] is True


@pytest.mark.parametrize("extra, fragment", [
    (["--packing"], "--share-prompt and --packing cannot be combined"),
    (["--tp", "2"], "--share-prompt is not verified with --tp"),
])
def test_cli_refuses_what_cannot_share(tmp_path, capsys, extra, fragment):
    code, _, err = run_main(micro_args(tmp_path, "--share-prompt", *extra), capsys)
    assert_one_line_error(code, err, fragment)


def test_cli_refuses_unpaired_data(tmp_path, capsys):
    from test_train_unpaired import unpaired_file

    data = unpaired_file(tmp_path / "unpaired.jsonl")
    code, _, err = run_main(micro_args(tmp_path, "--share-prompt", "--dataset", data, "--loss-type", "kto"), capsys)
    assert_one_line_error(code, err, "--share-prompt needs paired data")


def check_shared(*models):
    check_attention(SimpleNamespace(share_prompt=True, cp=1), *models)


def test_attention_with_a_sliding_window_is_refused():
    """A window the shared rows would not keep (a custom 4-D mask and attention by block are full causal)."""
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    small = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=2, attn_implementation="sdpa")
    mistral = MistralForCausalLM(MistralConfig(**small, sliding_window=4))
    with pytest.raises(UserError, match="sliding window of 4 tokens") as err:
        check_shared(mistral)
    assert "\n" not in str(err.value)
    check_shared(Qwen2ForCausalLM(Qwen2Config(**small, sliding_window=4, use_sliding_window=False)))
    check_shared(MistralForCausalLM(MistralConfig(**small, sliding_window=None)))


def test_block_attention_refuses_what_it_would_not_apply():
    q = torch.zeros(1, 2, 5, 4)
    with pytest.raises(ValueError, match="sliding_window=3"):
        block_attention(torch.nn.Module(), q, q, q, None, upo_shared_spans=((2, 2, 1),), sliding_window=3)


def test_attention_without_4d_masks_is_refused():
    model = micro_model("sdpa")
    check_shared(model, "adapters", None)  # sdpa: fine; references that are no model: skipped
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(UserError, match="flash-attention's varlen kernels cannot skip the chosen response") as err:
        check_shared(model)
    assert "\n" not in str(err.value)
