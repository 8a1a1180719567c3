"""What each rank of a context-parallel test runs (``test_context_parallel.py`` spawns them).

Every rank builds the same tiny Llama (grouped-query heads) and the same batch of pairs from the seed, runs the
module DDP wraps (``PreferenceModel``) on its share of every sequence (``--cp``'s split), and compares with the whole
sequences, which it computes itself in the same process: the loss and its metrics, every parameter's gradient summed
over the ranks (what ``--cp``'s gradient reduction does), the per-sequence log-probs. Float64: a wrong split shows
far above the reduction-order noise. A check raises AssertionError on its rank; ``mp.spawn`` reports it.
"""
from __future__ import annotations

import contextlib
import datetime
import faulthandler
import random

import torch
import torch.distributed as dist

from upo.train.context_parallel import SequenceSplit
from upo.train.data import PreferenceExample, collate
from upo.train.preference_model import PreferenceModel

PAD = 0
VOCAB = 97


def init(rank, world, init_file):
    faulthandler.enable()
    # a rank left waiting in a collective fails after 2 minutes instead of hanging the test run
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))


def finish():
    dist.barrier()  # every rank done talking before any tears gloo down
    dist.destroy_process_group()


def tiny_llama(seed: int, heads: int = 6, kv_heads: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
                         attn_implementation="sdpa", tie_word_embeddings=False)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).double()


def examples(seed: int, pairs: int) -> list[PreferenceExample]:
    """Pairs of uneven odd lengths (padding in every batch; lengths that no 2N divides)."""
    rng = random.Random(seed)

    def ids(n):
        return [rng.randrange(1, VOCAB) for _ in range(n)]

    return [PreferenceExample(i, ids(rng.randrange(3, 12)), ids(rng.randrange(1, 9)), ids(rng.randrange(1, 9)))
            for i in range(pairs)]


def loss_kwargs(loss_type: str) -> dict:
    if loss_type == "sigmoid+upo":
        return {"loss_type": ["sigmoid", "upo"], "beta": 0.1, "upo_lambda": 1.0, "baseline": "value"}
    return {"loss_type": [loss_type], "beta": 0.1}


def run(module, batch):
    """Loss output and the parameters' gradients (zeroed first)."""
    module.zero_grad(set_to_none=True)
    out = module(batch)
    out.loss.backward()
    grads = {name: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
             for name, p in module.named_parameters() if p.requires_grad}
    return out, grads


def differences(rank, world, seed, share_prompt, loss_type, models=None, rtol=1e-9) -> list[str]:
    """What differs between the split module (gradients summed over the ranks, as ``--cp``'s reduction does) and
    the whole sequences, run in this process: a frozen reference model (``models``: the policy and reference;
    default two float64 tiny Llamas with grouped heads), uneven odd lengths. ``rtol``: of every value and of every
    gradient relative to its largest entry."""
    import upo

    policy, ref = models or (tiny_llama(seed), tiny_llama(seed + 1))
    batch = collate(examples(seed, 3), PAD, False, share_prompt=share_prompt)
    value_head = None
    kwargs = loss_kwargs(loss_type)
    if "upo" in kwargs["loss_type"]:
        torch.manual_seed(seed + 2)
        dtype = policy.dtype
        value_head = upo.ValueHead(policy.config.hidden_size).to(dtype)
        batch.aux_chosen = torch.rand(3, 1, dtype=dtype)
        batch.aux_rejected = torch.rand(3, 1, dtype=dtype)
        kwargs.update(aux_weights=[1.0])
    whole = PreferenceModel(policy, value_head, ref, kwargs, "torch")
    parted = PreferenceModel(policy, value_head, ref, kwargs, "torch",
                             split=SequenceSplit(dist.group.WORLD, rank, world))
    out_whole, grads_whole = run(whole, batch)
    out_split, grads_split = run(parted, batch)
    found = []
    if not torch.allclose(out_split.loss, out_whole.loss, rtol=rtol, atol=rtol * 1e-2):
        found.append(f"loss {float(out_split.loss)} != {float(out_whole.loss)}")
    for key in ("logps/chosen", "logps/rejected", "rewards/margins", "entropy", "mean_token_accuracy",
                "logits/chosen", "logits/rejected", "value/loss"):
        if key in out_whole.metrics:
            a, b = float(out_split.metrics[key]), float(out_whole.metrics[key])
            if abs(a - b) > rtol * max(1.0, abs(b)):
                found.append(f"{key} {a} != {b}")
    for name, g in grads_whole.items():
        total = grads_split[name]
        dist.all_reduce(total)
        error = float((total - g).abs().max()) / max(float(g.abs().max()), 1e-30)
        if error > rtol:
            found.append(f"gradient of {name} (max abs diff / max abs {error:.3g})")
    assert any(float(g.abs().sum()) > 0 for g in grads_whole.values())
    return found


def check_split_equals_whole(rank, world, init_file, seed, cases):
    """Each ``(share_prompt, loss_type)`` of ``cases``: the split module equals the whole one. Then a NaN that only
    rank 0's tokens read: every rank refuses it alike (a rank that raised alone would leave the others waiting)."""
    init(rank, world, init_file)
    for share_prompt, loss_type in cases:
        found = differences(rank, world, seed, share_prompt, loss_type)
        assert not found, f"seed {seed}, share_prompt={share_prompt}, {loss_type}: {found}"
    check_non_finite_on_one_rank(rank)
    finish()


def check_smollm2(rank, world, init_file, seed):
    """SmolLM2-135M-Instruct (9 query and 3 key-value heads) over ``world`` ranks, prompt sharing's rows (the
    unshared ones run on the tiny models), with UPO's value head, in float64 (in fp32 the 30 layers' sums in another
    order differ by up to 2.6e-5 of a gradient's largest entry, measured): as the whole sequences within 1e-9 (the
    model is its own reference)."""
    init(rank, world, init_file)
    from real_model import smollm2

    model, _ = smollm2(torch.float64)
    assert model.config.num_attention_heads == 9 and model.config.num_key_value_heads == 3
    # Its first 4 of 30 layers: the heads, RoPE and weights are SmolLM2's; all 30 in float64 on 3 processes took
    # 172 s of a loaded CI worker (2026-12-08), and every layer splits the same way.
    model.model.layers = model.model.layers[:4]
    model.config.num_hidden_layers = 4
    found = differences(rank, world, seed, True, "sigmoid+upo", models=(model, model), rtol=1e-9)
    assert not found, f"seed {seed}: {found}"
    finish()


def check_non_finite_on_one_rank(rank):
    import pytest

    import upo

    hidden = torch.randn(4, 3, 8, dtype=torch.float64)
    if rank == 0:
        hidden[1, 1, 0] = float("nan")
    labels = torch.randint(0, 11, (4, 3))
    with pytest.raises(ValueError, match="non-finite log-probs"):
        upo.fused_loss(hidden, torch.randn(11, 8, dtype=torch.float64), labels, backend="torch",
                       ref_chosen_logps=torch.zeros(2, dtype=torch.float64),
                       ref_rejected_logps=torch.zeros(2, dtype=torch.float64), sequence_group=dist.group.WORLD)


def check_faults_are_caught(rank, world, init_file, seed, faults):
    """Each planted fault makes :func:`differences` find something (shared rows, sigmoid + upo)."""
    init(rank, world, init_file)
    for fault in faults:
        with planted(fault):
            found = differences(rank, world, seed, True, "sigmoid+upo")
        assert found, f"seed {seed}: the planted fault {fault!r} went unnoticed"
    finish()


@contextlib.contextmanager
def planted(fault: str):
    """One planted fault, undone on exit; none changes what the ranks send each other (no rank waits alone)."""
    import upo.context_parallel as cp
    import upo.fused as fused
    import upo.train.context_parallel as train_cp
    import upo_kernels.context_parallel as kernels

    saved = [(fused, "sum_over_ranks", fused.sum_over_ranks), (train_cp, "split_rows", train_cp.split_rows),
             (cp, "shared_plan", cp.shared_plan)]

    def sum_with(backward_scale):
        class Sum(torch.autograd.Function):
            @staticmethod
            def forward(ctx, partial, group):
                total = partial.clone()
                dist.all_reduce(total, group=group)
                ctx.size = dist.get_world_size(group)
                return total

            @staticmethod
            def backward(ctx, grad):
                return grad * backward_scale(ctx.size), None

        return lambda partial, group: (Sum.apply(partial, group) if partial.is_floating_point()
                                       else kernels.sum_over_ranks(partial, group))

    if fault == "no_reduction":  # the log-prob sums not summed over the ranks (the counts still are)
        fused.sum_over_ranks = lambda partial, group: (partial if partial.is_floating_point()
                                                       else kernels.sum_over_ranks(partial, group))
    elif fault == "backward_times_n":  # the sum's backward multiplies by N
        fused.sum_over_ranks = sum_with(lambda size: size)
    elif fault == "position_off_by_one":  # the second chunk's positions one too far

        def shifted(*args, **kwargs):
            rows = cp.split_rows(*args, **kwargs)
            half = rows.position_ids.shape[1] // 2
            rows.position_ids = torch.cat([rows.position_ids[:, :half], rows.position_ids[:, half:] + 1], dim=1)
            return rows

        train_cp.split_rows = shifted
    elif fault == "rejected_sees_chosen":  # shared rows attended as plain causal rows
        cp.shared_plan = lambda length, rank, size, span: cp.causal_plan(length, rank, size)
    else:
        raise ValueError(fault)
    try:
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)
