"""The ```python blocks of README.md and docs/losses.md (the whole Python API) run as written, on tiny tensors
and a tiny model.

A block takes as given the names it uses but does not define (``hidden``, ``model``, ``ds``, ...): ``given()``
supplies them, and the block's text runs unchanged. A new block of the README runs here too; one that uses a
name ``given()`` does not supply fails with a NameError naming it (add it to ``given()``).
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from documented_commands import fenced_blocks, without_comment
from helpers import MICRO_MODEL

REPO = Path(__file__).resolve().parents[1]
B, T, D = 3, 7, 32  # pairs, tokens per row, hidden size of the micro Llama
# README blocks known not to run as written on a CPU, by their first line, with why (strict: fixing one fails it)
KNOWN_BROKEN = {
    "from upo.integrations.trl import UPOConfig, UPOTrainer": (
        "UPOConfig keeps TRL's bf16=True, which transformers refuses without a GPU unless use_cpu=True "
        "('Your setup doesn't support bf16/gpu'): on a CPU the block stops at UPOConfig(...)"),
}


def first_line(code: str) -> str:
    return " ".join(without_comment(code.lstrip().splitlines()[0]).split())


PYTHON_API_PAGES = ("README.md", "docs/losses.md")


def readme_blocks():
    return [block for block in fenced_blocks(REPO, "python") if block.path in PYTHON_API_PAGES]


def block_params():
    params = []
    for block in readme_blocks():
        reason = KNOWN_BROKEN.get(first_line(block.code))
        marks = [pytest.mark.xfail(not torch.cuda.is_available(), strict=True, raises=ValueError, reason=reason)
                 ] if reason else []
        params.append(pytest.param(block, id=f"{block.path}:{block.line}", marks=marks))
    return params


def pretrained_micro_llama(folder: Path):
    """The micro Llama as a reader's model is: loaded from a folder (TRL reloads its reference from there),
    with trl_tiny's word-level tokenizer."""
    import trl_tiny
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    tokenizer = trl_tiny.make_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=64, tie_word_embeddings=False,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
                         **MICRO_MODEL)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    return AutoModelForCausalLM.from_pretrained(folder).eval(), tokenizer


def given(folder: Path) -> dict:
    """What the README's blocks take as given: tiny tensors (odd sizes), the micro Llama, a tiny TRL set-up."""
    import trl_tiny

    generator = torch.Generator().manual_seed(0)
    model, tokenizer = pretrained_micro_llama(folder / "micro-llama")
    vocab = model.config.vocab_size

    def randn(*shape, grad=False):
        return torch.randn(*shape, generator=generator, dtype=torch.float32).requires_grad_(grad)

    labels = torch.randint(0, vocab, (2 * B, T), generator=generator)
    labels[:, :2] = -100  # the prompt's tokens
    return {
        "torch": torch,
        "policy_chosen_logps": (-randn(B).abs()).requires_grad_(),
        "policy_rejected_logps": (-randn(B).abs()).requires_grad_(),
        "ref_chosen_logps": -randn(B).abs(), "ref_rejected_logps": -randn(B).abs(),
        "n_c": torch.tensor([5, 3, 4]), "n_r": torch.tensor([2, 6, 4]),
        "a_c": torch.rand(B, generator=generator), "a_r": torch.rand(B, generator=generator),
        "hidden": randn(2 * B, T, D, grad=True), "ref_hidden": randn(2 * B, T, D), "labels": labels,
        "weight": randn(vocab, D, grad=True), "r_c": -randn(B).abs(), "r_r": -randn(B).abs(),
        "model": model, "input_ids": torch.randint(0, vocab, (B, T), generator=generator),
        "tokenizer": tokenizer, "ds": trl_tiny.make_dataset(4),
        "my_reward": lambda prompts, completions, **columns: [float(len(c)) for c in completions],
    }


def test_readme_has_python_blocks():
    assert {block.path for block in readme_blocks()} == set(PYTHON_API_PAGES)


@pytest.mark.parametrize("block", block_params())
def test_readme_python_block_runs(block, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # what a block writes ("out") stays here
    names = given(tmp_path)
    code = compile(block.code, f"{block.path}:{block.line}", "exec")
    exec(code, names)  # noqa: S102 - the README's own text
    if "logp" in names:  # the Python API block: what it computed, against the model's own log_softmax
        model, input_ids = names["model"], names["input_ids"]
        with torch.no_grad():
            own = torch.log_softmax(model(input_ids=input_ids).logits.double(), -1)[:, :-1]
        expected = own.gather(-1, input_ids[:, 1:, None])[..., 0]
        torch.testing.assert_close(names["logp"].double(), expected, atol=1e-5, rtol=1e-5)
        labels, valid = names["labels"], names["labels"] != -100
        token_logp = torch.log_softmax(names["ref_hidden"].double() @ names["weight"].double().T, -1)
        ref_sums = (token_logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0] * valid).sum(-1)
        torch.testing.assert_close(names["sums"].double(), ref_sums, atol=1e-4, rtol=1e-5)
        assert names["counts"].tolist() == valid.sum(-1).tolist()
        assert math.isfinite(names["out"].loss.item())
        assert names["policy_chosen_logps"].grad is not None and names["policy_chosen_logps"].grad.abs().sum() > 0
