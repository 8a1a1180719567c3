"""Token statistics (``linear_logprobs(..., stats=...)``) of every backend against float64.

Oracle: ``reference_token_stats`` / ``reference_stats_from_logits`` on the materialised float64
logits. Backends: the chunked torch one and both Triton forwards (``UPO_FWD_IMPL=fused|cublas``,
under ``TRITON_INTERPRET=1`` on CPU: fp32, or fp16 where ``tl.dot`` must see 16-bit inputs), with
bias, ``logit_scale``, ``softcap``, odd shapes and several vocabulary splits / chunks / token
groups. Kernel calls run under ``poison_outputs()``: an unwritten partial is NaN and fails.
"""
from __future__ import annotations

import pytest
import torch

from helpers import check_stats, gen, has_both_top1_kinds, leaf, make_inputs, new_seed, rel_err, stats_inputs
from upo_kernels import TOKEN_STATS, TokenLogprobs, linear_logprobs, reference, token_stats
from upo_kernels.buffers import poison_outputs

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="tests/test_gpu.py covers CUDA")

ALL = TOKEN_STATS
VARIANTS = [("torch", None), ("triton", "fused"), ("triton", "cublas")]
VARIANT_IDS = ["torch", "triton_fused", "triton_cublas"]


@pytest.fixture(autouse=True)
def _default_knobs(monkeypatch):
    for name in ("UPO_FWD_IMPL", "UPO_LOGITS", "UPO_GROUP_MB", "UPO_TILE_MB", "UPO_TRITON_FWD"):
        monkeypatch.delenv(name, raising=False)


def _select(monkeypatch, impl):
    if impl is not None:
        monkeypatch.setenv("UPO_FWD_IMPL", impl)


def run_stats(inp, backend, stats=ALL, **kw):
    with torch.no_grad(), poison_outputs():
        return linear_logprobs(inp.hidden, inp.weight, inp.labels, bias=inp.bias, backend=backend, stats=stats, **kw)


CASES = [  # (id, make_inputs kwargs, kernel kwargs, tiles)
    ("odd_bias", dict(n=45, d=24, v=211, bias=True, ignore_frac=0.3), {}, dict(chunk_tokens=16, chunk_vocab=50)),
    ("scale_cap_2d", dict(n=None, lead_shape=(3, 13), d=20, v=173, ignore_frac=0.2),
     dict(logit_scale=0.6, softcap=4.0), dict(chunk_tokens=7, chunk_vocab=97)),
    ("cap_bias_default_tiles", dict(n=29, d=16, v=300, bias=True, ignore_frac=0.1),
     dict(logit_scale=1.5, softcap=6.0), {}),
    ("tiny_v5", dict(n=3, d=3, v=5, ignore_frac=0.0), {}, dict(chunk_tokens=2, chunk_vocab=2)),
]


@pytest.mark.parametrize("backend,impl", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_all_stats_vs_reference(monkeypatch, backend, impl, case):
    _, mk, kern, tiles = case
    _select(monkeypatch, impl)
    seed = new_seed()
    mk = dict(mk)
    inp = stats_inputs(mk.pop("n"), mk.pop("d"), mk.pop("v"), seed, logit_kw=kern, **mk)
    out = run_stats(inp, backend, **kern, **tiles)
    assert isinstance(out, TokenLogprobs) and out.logp.shape == inp.labels.shape
    ref_logp = reference.reference_token_logprobs(inp.hidden, inp.weight, inp.labels, inp.bias, **kern)
    assert (out.logp.double() - ref_logp).abs().max() < 1e-5 * (1 + ref_logp.abs().max()), f"log-probs (seed={seed})"
    z = reference.reference_logits(inp.hidden, inp.weight, inp.bias, **kern)
    ref = reference.reference_token_stats(inp.hidden, inp.weight, inp.labels, inp.bias, **kern)
    check_stats(out.stats, ref, z, inp.labels, ALL, f"{backend}/{impl}", seed)
    if inp.labels.numel() >= 20:  # the tiny case may draw only one kind
        assert has_both_top1_kinds(ref["is_top1"], inp.labels), "the case must have top-1 and other labels"


@pytest.mark.parametrize("backend,impl", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("name", ALL)
def test_each_stat_alone(monkeypatch, backend, impl, name):
    """One statistic at a time: every constexpr branch of both Triton forwards on its own."""
    _select(monkeypatch, impl)
    seed = new_seed()
    inp = stats_inputs(40, 16, 150, seed, bias=True, ignore_frac=0.2)
    kern = dict(logit_scale=0.8, softcap=5.0)
    out = run_stats(inp, backend, stats=(name,), chunk_tokens=24, chunk_vocab=64, **kern)
    z = reference.reference_logits(inp.hidden, inp.weight, inp.bias, **kern)
    ref = reference.reference_token_stats(inp.hidden, inp.weight, inp.labels, inp.bias, **kern)
    check_stats(out.stats, ref, z, inp.labels, (name,), f"{backend}/{impl}", seed)


TIES = [  # (tied columns, labels, expected is_top1): tiles of 50 (torch, cuBLAS); the fused kernel's
    # interpreter tiles of 32 and vocabulary splits of 64
    ((7, 9, 120), [7, 9, 120, 8, 159, -100], [1.0, 0.0, 0.0, 0.0, 0.0, 0.0]),
    ((49, 50), [49, 50], [1.0, 0.0]),
    ((31, 32), [31, 32], [1.0, 0.0]),
    ((63, 64), [63, 64], [1.0, 0.0]),
]


@pytest.mark.parametrize("backend,impl", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("tie", TIES, ids=["in_and_across_tiles", "tile_edge_50", "tile_edge_32", "split_edge_64"])
def test_top1_ties_go_to_the_first_index(monkeypatch, backend, impl, tie):
    """Zero hidden rows: the logits are the (capped) bias, with exact ties inside one tile and across
    tile / split edges; only the first index of a tie is the top-1 token (TRL: argmax's rule)."""
    _select(monkeypatch, impl)
    tied, labels, expected = tie
    v = 160
    bias = torch.linspace(-2.0, 1.0, v)
    bias[list(tied)] = 3.0
    hidden = torch.zeros(len(labels), 8)
    weight = torch.randn(v, 8, generator=gen(new_seed()))
    labels = torch.tensor(labels)
    with torch.no_grad(), poison_outputs():
        out = linear_logprobs(hidden, weight, labels, bias=bias, backend=backend, stats=("is_top1", "entropy"),
                              softcap=5.0, chunk_tokens=4, chunk_vocab=50)
    assert out.stats["is_top1"].tolist() == expected
    ref = reference.reference_token_stats(hidden, weight, labels, bias, softcap=5.0)
    assert torch.equal(ref["is_top1"].float(), out.stats["is_top1"])


@pytest.mark.parametrize("backend,impl", VARIANTS, ids=VARIANT_IDS)
def test_minus_inf_logits(monkeypatch, backend, impl):
    """-inf bias entries (masked vocabulary), a whole tile of them included: they add exactly 0 to
    every sum (no NaN from 0 * -inf), and make the mean logit -inf, as the definition says."""
    _select(monkeypatch, impl)
    seed = new_seed()
    inp = stats_inputs(20, 12, 130, seed, bias=True, ignore_frac=0.1)
    inp.bias[[3, 70]] = float("-inf")
    inp.bias[100:130] = float("-inf")  # the last tile of 30 columns
    inp.labels[(inp.labels == 3) | (inp.labels == 70) | (inp.labels >= 100)] = 5
    out = run_stats(inp, backend, chunk_tokens=8, chunk_vocab=50)
    z = reference.reference_logits(inp.hidden, inp.weight, inp.bias)
    ref = reference.reference_token_stats(inp.hidden, inp.weight, inp.labels, inp.bias)
    kept = inp.labels != -100
    assert (out.stats["mean_logits"][kept] == float("-inf")).all()
    finite = {k: v for k, v in out.stats.items() if k != "mean_logits"}
    check_stats(finite, ref, z, inp.labels, tuple(finite), f"{backend}/{impl}", seed)


@pytest.mark.parametrize("impl", ["fused", "cublas"])
def test_input_dtype_logits(monkeypatch, impl):
    """``UPO_LOGITS=input``, fp16 (the interpreter's tl.dot is exact for it): the statistics are those
    of the logits rounded to fp16, as for the log-probs."""
    monkeypatch.setenv("UPO_FWD_IMPL", impl)
    monkeypatch.setenv("UPO_LOGITS", "input")
    seed = new_seed()
    inp = stats_inputs(48, 32, 257, seed, dtype=torch.float16, ignore_frac=0.2)
    out = run_stats(inp, "triton", chunk_tokens=20, chunk_vocab=100)
    exact = inp.hidden.double() @ inp.weight.double().t()
    rounded = exact.half().double()
    ref = reference.reference_stats_from_logits(rounded, inp.labels)
    # our fp32 accumulation rounds to fp16 where float64 does, up to one fp16 ulp of a few logits
    check_stats(out.stats, ref, rounded, inp.labels, ALL, f"input logits/{impl}", seed, tol=2e-3)
    unrounded = reference.reference_stats_from_logits(exact, inp.labels)
    for name in ("entropy", "log_sum_sq_probs"):
        assert rel_err(out.stats[name], ref[name]) < 0.5 * rel_err(unrounded[name], ref[name]), (
            f"{name}: not the statistics of the rounded logits (seed={seed})")


@pytest.mark.parametrize("backend,impl", VARIANTS, ids=VARIANT_IDS)
def test_default_path_is_unchanged(monkeypatch, backend, impl):
    """Without statistics: a plain tensor, the same numbers and gradients (Triton: no statistics code
    runs, its partial buffers are booby-trapped); with them the log-probs and their gradients are bit for
    bit the same on both backends: one numerical path for a log-prob, whoever asks (the torch backend
    runs its one tile pass either way, docs/kernels.md)."""
    _select(monkeypatch, impl)
    seed = new_seed()
    inp = stats_inputs(33, 16, 140, seed, bias=True, ignore_frac=0.25)
    up = torch.randn(33, generator=gen(seed + 1))

    def run(**kw):
        h, w = leaf(inp.hidden), leaf(inp.weight)
        with poison_outputs():
            out = linear_logprobs(h, w, inp.labels, bias=inp.bias, backend=backend, chunk_tokens=16,
                                  chunk_vocab=60, **kw)
        (out.logp if isinstance(out, TokenLogprobs) else out).backward(up)
        return out, h.grad, w.grad

    def trap(*args, **kwargs):
        raise AssertionError("statistics code ran without statistics")

    with monkeypatch.context() as mp:
        mp.setattr(token_stats, "part_buffer", trap)
        plain, gh, gw = run()
        again, gh2, gw2 = run(stats=())
    assert type(plain) is torch.Tensor and type(again) is torch.Tensor
    assert torch.equal(plain, again) and torch.equal(gh, gh2) and torch.equal(gw, gw2)
    with_stats, gh3, gw3 = run(stats=ALL)
    assert torch.equal(with_stats.logp, plain) and torch.equal(gh3, gh) and torch.equal(gw3, gw)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_empty_and_all_ignored(backend):
    weight = torch.randn(17, 8)
    with poison_outputs():
        empty = linear_logprobs(torch.zeros(0, 8), weight, torch.zeros(0, dtype=torch.long), backend=backend,
                                stats=ALL)
        ignored = linear_logprobs(torch.randn(5, 8), weight, torch.full((5,), -100), backend=backend, stats=ALL)
    assert all(v.shape == (0,) for v in empty.stats.values())
    assert all(torch.equal(v, torch.zeros(5)) for v in ignored.stats.values())


def test_float64_torch_backend():
    """fp64 inputs stay fp64 in the torch backend: the statistics match the oracle to ~1e-12."""
    seed = new_seed()
    inp = stats_inputs(30, 16, 120, seed, bias=True, dtype=torch.float64, ignore_frac=0.2)
    out = run_stats(inp, "torch", chunk_tokens=8, chunk_vocab=32, logit_scale=0.9, softcap=4.0)
    ref = reference.reference_token_stats(inp.hidden, inp.weight, inp.labels, inp.bias, logit_scale=0.9, softcap=4.0)
    for name, value in out.stats.items():
        assert value.dtype == torch.float64
        assert (value - ref[name]).abs().max() < 1e-10, f"{name} (seed={seed})"


def test_gradient_flows_through_logp_only():
    inp = stats_inputs(12, 8, 40, new_seed(), ignore_frac=0.0)
    h = leaf(inp.hidden)
    out = linear_logprobs(h, inp.weight, inp.labels, backend="torch", stats=("entropy",))
    assert out.logp.requires_grad and not out.stats["entropy"].requires_grad
    (out.logp.sum() + out.stats["entropy"].sum()).backward()
    assert h.grad is not None and torch.isfinite(h.grad).all()


def test_stats_names_are_checked():
    inp = make_inputs(4, 8, 11, ignore_frac=0.0)
    for bad in (("entropy", "perplexity"), ("top1",), 3):
        with pytest.raises(ValueError, match=r"stats.*entropy, log_sum_sq_probs, mean_logits, is_top1"):
            linear_logprobs(inp.hidden, inp.weight, inp.labels, stats=bad)
    one = linear_logprobs(inp.hidden, inp.weight, inp.labels, stats="is_top1")  # a single name is fine
    assert tuple(one.stats) == ("is_top1",)
    both = linear_logprobs(inp.hidden, inp.weight, inp.labels, stats=["is_top1", "entropy", "entropy"])
    assert tuple(both.stats) == ("entropy", "is_top1")  # canonical order, once each


@pytest.mark.parametrize("backend,impl", VARIANTS, ids=VARIANT_IDS)
def test_raw_forward_with_ignored_rows(monkeypatch, backend, impl):
    """The backends' own ``forward`` (which ``linear_logprobs`` hands only labelled rows) on rows with
    ``ignore_index`` labels: their statistics are 0, the others' exact; lse is that of the plain
    forward (the same merge)."""
    _select(monkeypatch, impl)
    from upo_kernels.backends import ops as _ops

    ops = _ops(backend)
    seed = new_seed()
    inp = stats_inputs(37, 20, 190, seed, bias=True, ignore_frac=0.3)
    with poison_outputs():
        logp, lse, values = ops.forward(inp.hidden, inp.weight, inp.labels, inp.bias, 0.7, 5.0, -100,
                                        chunk_tokens=16, chunk_vocab=64, stats=ALL)
        _, plain_lse = ops.forward(inp.hidden, inp.weight, inp.labels, inp.bias, 0.7, 5.0, -100,
                                   chunk_tokens=16, chunk_vocab=64)
    assert (lse - plain_lse).abs().max() < 1e-5
    z = reference.reference_logits(inp.hidden, inp.weight, inp.bias, 0.7, 5.0)
    ref = reference.reference_token_stats(inp.hidden, inp.weight, inp.labels, inp.bias, 0.7, 5.0)
    check_stats(values, ref, z, inp.labels, ALL, f"raw {backend}/{impl}", seed)


def test_cost_benchmark_smoke(capsys):
    """``benchmarks/token_stats_cost.py`` runs (tiny shape): every variant timed, ratios reported."""
    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # benchmarks/: the checkout's
    from benchmarks import token_stats_cost

    doc = token_stats_cost.main(["--smoke"])
    assert set(doc["wall"]) == {"kernel", "kernel_all_stats", "fused_loss", "fused_loss_stats"}
    assert set(doc["cpu_ratios"]) == {"kernel_all_stats/kernel", "fused_loss_stats/fused_loss"}
    assert "per-round ratio" in capsys.readouterr().out
