"""pytest-benchmark micro-cases of benchmarks/long_sequence.py: forward + backward of one pair, a tiny Llama.

    pytest benchmarks/bench_long_sequence.py --benchmark-only --benchmark-autosave      # saved under .benchmarks/
    pytest benchmarks/bench_long_sequence.py --benchmark-only --benchmark-compare       # against the last saved run
    pytest benchmarks/ --benchmark-only --benchmark-json=bench-results/bench.json        # with the other micro-cases

Not collected by the test run (``testpaths = tests``). Each case is one system's forward and backward of one pair
(no optimiser step: TRL's ``training_step`` is its forward and backward) on a tiny random Llama (vocabulary of
bytes, 2 layers), for ``upo-train`` with and without ``--share-prompt`` and TRL's ``DPOTrainer``, on a
prompt-heavy pair; ``test_rejected_block_attention`` times prompt sharing's attention of the rejected response
(``prefix_causal_attention``, forward and backward, SmolLM2's heads) against the masked SDPA call it replaced.
``extra_info`` of the step cases holds the step's floor (``memory_floor``) and its peak extra RSS measured in this
shared process (indicative only: the figures that count come from ``python -m benchmarks.long_sequence``, a fresh
process per case).
"""
from __future__ import annotations

import pytest
import torch

from benchmarks import measure
from benchmarks.long_sequence import (Case, is_shared, make_trl_trainer, make_upo_train, memory_floor, model_config,
                                      tiny_model, write_pairs)
from upo_kernels.prefix_attention import prefix_causal_attention, prefix_causal_attention_masked

LENGTHS = [256, 1024]
SYSTEMS = ["upo-train", "upo-train-shared", "trl"]


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("tiny-model"))


def _upo_train_step(case, data, workdir):
    trainer = make_upo_train(case, data, workdir)
    batch = trainer.make_batch([0])

    def step():
        trainer.model(batch).loss.backward()
        trainer.optimizer.zero_grad(set_to_none=True)

    return step, trainer.close, sum(p.numel() for p in trainer.params)


def _trl_step(case, data, workdir):
    trainer = make_trl_trainer(case, data, workdir)
    batch = next(iter(trainer.get_train_dataloader()))
    model = trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train's loop, which this bypasses

    def step():
        trainer.training_step(model, batch)
        model.zero_grad(set_to_none=True)

    return step, lambda: None, sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("system", SYSTEMS)
def test_step(benchmark, model_folder, tmp_path, system, length):
    if system == "trl":
        pytest.importorskip("trl")
    case = Case(system, "prompt_heavy", length, gradient_checkpointing=True, model=model_folder)
    data = write_pairs(case, tmp_path / "pairs.jsonl")
    step, close, trainable = (_trl_step if system == "trl" else _upo_train_step)(case, data, tmp_path)
    try:
        step()  # warm-up: first-call costs out of the timing
        with measure.PeakMemory("cpu") as mem:
            step()
        benchmark.group = f"prompt_heavy-L{length}"
        floor = memory_floor(model_config(model_folder), case.prompt_tokens, case.response_tokens,
                             share_prompt=is_shared(system), trainable=trainable)
        benchmark.extra_info.update(system=system, length=length, prompt_tokens=case.prompt_tokens,
                                    response_tokens=case.response_tokens, floor_bytes=floor["total"],
                                    peak_extra_bytes=mem.extra)
        benchmark.pedantic(step, rounds=5, warmup_rounds=0)
    finally:
        close()


@pytest.mark.parametrize("prompt, response", [(768, 256), (3072, 1024)])
@pytest.mark.parametrize("impl", [prefix_causal_attention, prefix_causal_attention_masked], ids=["split", "masked"])
def test_rejected_block_attention(benchmark, impl, prompt, response):
    """One layer's attention of a rejected response over the prompt and itself, SmolLM2-135M's heads (9 query
    heads, 3 key/value heads of 64), fp32, forward and backward."""
    heads, kv_heads, head_dim = 9, 3, 64
    query = torch.randn(1, heads, response, head_dim, requires_grad=True)
    prefix_key, prefix_value, key, value = (
        torch.randn(1, kv_heads, tokens, head_dim, requires_grad=True) for tokens in (prompt, prompt, response,
                                                                                        response))

    def step():
        impl(query, prefix_key, prefix_value, key, value).sum().backward()

    benchmark.group = f"rejected-block-P{prompt}-R{response}"
    benchmark.extra_info.update(prompt_tokens=prompt, response_tokens=response, heads=heads, kv_heads=kv_heads)
    benchmark.pedantic(step, rounds=5, warmup_rounds=1)
