"""The Triton backend's tile passes: token groups x vocabulary chunks, the cuBLAS forward, the
row skipping of ignored tokens and ``UPO_LOGITS=input``.

Under ``TRITON_INTERPRET=1`` on CPU (fp32, or fp16 where a forward's ``tl.dot`` must see 16-bit
inputs: the interpreter's bf16 dot is wrong; the bf16 backward has no ``tl.dot``). Kernel calls
run under ``poison_outputs()``. The working-memory tests track every tensor the passes allocate
and prove that no full-size fp32 grad_hidden, no ``[tokens, vocab]`` tensor and no gathered copy
of the hidden states outlives its use.
"""
from __future__ import annotations

import functools
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import (TOL_GRAD, TOL_OUT, assert_close_rel, check_no_worse_than_naive, check_split_passes, gen,
                     make_inputs, new_seed, reference_floors, reference_token_outputs, rel_err, run_token_fn)
from upo_kernels import linear_logprobs, reference
from upo_kernels.buffers import poison_outputs

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="tests/test_gpu.py covers CUDA")


def _ops():
    from upo_kernels import triton_ops
    return triton_ops


@pytest.fixture(autouse=True)
def _default_knobs(monkeypatch):
    """Each test starts from the library defaults, whatever the caller's environment says."""
    for name in ("UPO_FWD_IMPL", "UPO_LOGITS", "UPO_GROUP_MB", "UPO_TILE_MB", "UPO_TRITON_FWD"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(params=["fused", "cublas"])
def fwd_impl(request, monkeypatch):
    monkeypatch.setenv("UPO_FWD_IMPL", request.param)
    return request.param


# ----------------------------------------------------------------------------- tile sizes
@pytest.mark.parametrize("n,d,v", [(16384, 4096, 128256), (32768, 4096, 128256), (8192, 4096, 256000),
                                   (5000, 4096, 32000), (16384, 256, 32000), (1, 8, 5), (1000, 12288, 151936)])
def test_tile_sizes_respect_budgets(n, d, v):
    ops = _ops()
    group, chunk = ops._tiles(n, d, v)
    groups = -(-n // group)
    assert 1 <= group <= n and 1 <= chunk <= max(v, 128)
    assert group * d * 4 <= ops.DEFAULT_GROUP_MB * 2**20 or group <= 128, "grad_hidden accumulator over budget"
    assert group * chunk * 4 <= ops.DEFAULT_TILE_MB * 2**20 or chunk == 128, "logit tile over budget"
    assert groups * group - n < 128 * groups, "groups are balanced: no near-empty tail group"
    if (n, d, v) == (16384, 4096, 128256):  # the headline: 4 groups of 4096 tokens, 4096-column tiles
        assert (group, chunk) == (4096, 4096)


def test_tile_env_is_read_and_checked(monkeypatch):
    ops = _ops()
    monkeypatch.setenv("UPO_GROUP_MB", "8")  # 512 tokens of D = 4096
    monkeypatch.setenv("UPO_TILE_MB", "4")   # 2048 columns of 512 tokens
    assert ops._tiles(2048, 4096, 128256) == (512, 2048)
    for name, bad in (("UPO_GROUP_MB", "0"), ("UPO_TILE_MB", "-3"), ("UPO_TILE_MB", "lots")):
        with monkeypatch.context() as mp:
            mp.setenv(name, bad)
            with pytest.raises(ValueError, match=name):
                ops._tiles(2048, 4096, 128256)
    monkeypatch.setenv("UPO_FWD_IMPL", "cutlass")
    with pytest.raises(ValueError, match="UPO_FWD_IMPL"):
        ops.forward_impl()


# ----------------------------------------------------------------------------- fp32 vs float64
@pytest.mark.parametrize("chunks", [(7, 13), (16, 1000), (23, 97), (None, None)])
@pytest.mark.parametrize("cap", [None, 3.0])
def test_groups_and_chunks_vs_reference(fwd_impl, chunks, cap):
    """Ragged token groups and vocabulary chunks, forward (both impls) and backward, fp32."""
    seed = new_seed()
    inp = make_inputs(45, 24, 211, seed=seed, bias=True, ignore_frac=0.3)
    check_split_passes(_ops(), inp, seed, scale=0.7, cap=cap, chunk_tokens=chunks[0], chunk_vocab=chunks[1])


def test_cublas_forward_public_entry(fwd_impl):
    """``linear_logprobs(backend='triton')`` end to end with either forward and small tiles."""
    seed = new_seed()
    inp = make_inputs(None, 40, 509, seed=seed, lead_shape=(3, 19), ignore_frac=0.25)
    up = torch.randn(inp.labels.shape, generator=gen(seed + 1))
    ref_out, ref_gh, ref_gw, _ = reference_token_outputs(inp, up, softcap=6.0)
    fl = reference_floors(inp, up, softcap=6.0)
    out, gh, gw, _ = run_token_fn(linear_logprobs, inp, up, backend="triton", softcap=6.0,
                                  chunk_tokens=20, chunk_vocab=128)
    assert (out[inp.labels == -100] == 0).all()
    assert_close_rel(out, ref_out, TOL_OUT, "log-probs", seed, fl["out"])
    assert_close_rel(gh, ref_gh, TOL_GRAD, "grad_hidden", seed, fl["gh"])
    assert_close_rel(gw, ref_gw, TOL_GRAD, "grad_weight", seed, fl["gw"])


def test_cublas_forward_bf16_is_fp32_exact(monkeypatch):
    """bf16 inputs, cuBLAS forward: the logit tiles are fp32 (here from fp32 copies, on CUDA from
    cuBLAS's fp32 output), so log-probs match float64 of the same bf16 values to fp32 accuracy."""
    monkeypatch.setenv("UPO_FWD_IMPL", "cublas")
    seed = new_seed()
    inp = make_inputs(70, 48, 1003, dtype=torch.bfloat16, seed=seed, ignore_frac=0.2)
    up = torch.zeros(70)
    ref_out = reference_token_outputs(inp, up)[0]
    with poison_outputs():
        logp, _ = _ops().forward(inp.hidden, inp.weight, inp.labels, None, 1.0, None, -100,
                                 chunk_tokens=32, chunk_vocab=300)
    assert_close_rel(logp, ref_out, TOL_OUT, "log-probs", seed)


@pytest.mark.parametrize("group", [48, 160])
def test_bf16_backward_groups_no_worse_than_naive(group):
    """bf16 with several token groups (grad_weight summed in bf16 over the groups) still meets the
    naive-bf16 rule; ``group=160`` is the single-group path for comparison."""
    inp = make_inputs(160, 24, 701, dtype=torch.bfloat16, ignore_frac=0.2)
    fn = functools.partial(linear_logprobs, chunk_tokens=group, chunk_vocab=200)
    # cuBLAS forward: the fused forward's bf16 tl.dot cannot run in the interpreter
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("UPO_FWD_IMPL", "cublas")
        check_no_worse_than_naive(fn, inp, "triton")


# ----------------------------------------------------------------------------- working memory
class _LiveBytes(TorchDispatchMode):
    """Bytes of the storages created by torch ops while active, and their peak (views counted once)."""

    def __init__(self):
        super().__init__()
        self.live, self.peak, self.largest = 0, 0, 0
        self._refs = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(a, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                self._track(t, inputs)
        return out

    def _track(self, t, inputs):
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in self._refs:
            if key in inputs:
                return  # a view (or in-place result) of memory that existed before: not an allocation
            self._refs[key] = [storage.nbytes(), 0]
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
            self.largest = max(self.largest, storage.nbytes())
        self._refs[key][1] += 1
        weakref.finalize(t, self._release, key)

    def _release(self, key):
        entry = self._refs.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.live -= entry[0]
            del self._refs[key]


def _backward_working_memory(ops, n, d, v, with_rows):
    """(peak bytes beyond the returned grads, largest allocation) of one bf16 backward over n tokens;
    ``with_rows``: the tokens are every other row of a 2n-row hidden (prompt rows in between)."""
    inp = make_inputs(2 * n if with_rows else n, d, v, dtype=torch.bfloat16, ignore_frac=0.1)
    rows = torch.arange(0, 2 * n, 2) if with_rows else None
    h_used = inp.hidden if rows is None else inp.hidden[rows]
    labels = inp.labels if rows is None else inp.labels[rows]
    up = torch.randn(n)
    lse = torch.logsumexp(reference.reference_logits(h_used, inp.weight), -1).float()
    with _LiveBytes() as mem:
        gh, gw, _ = ops.backward(up, inp.hidden, inp.weight, labels, lse, rows=rows)
    assert gh.dtype == torch.bfloat16 and gw.dtype == torch.bfloat16 and gh.shape == inp.hidden.shape
    if rows is not None:
        assert (gh[1::2] == 0).all(), "rows not listed must get exactly zero gradient"
    returned = gh.numel() * 2 + gw.numel() * 2
    return mem.peak - returned, mem.largest


@pytest.mark.parametrize("with_rows", [False, True], ids=["all_rows", "every_other_row"])
def test_backward_working_memory_is_group_sized(monkeypatch, with_rows):
    """bf16, groups of 128 tokens: the backward's working memory does not grow with the tokens
    (beyond O(tokens) vectors), and no tensor is as large as an fp32 [N, D] or an [N, V]."""
    ops = _ops()
    d, v = 256, 700
    monkeypatch.setenv("UPO_GROUP_MB", str(128 * d * 4 / 2**20))   # groups of 128 tokens
    monkeypatch.setenv("UPO_TILE_MB", str(128 * 256 * 4 / 2**20))  # 256-column tiles
    assert ops._tiles(2048, d, v) == (128, 256)
    small, _ = _backward_working_memory(ops, 256, d, v, with_rows)
    big, largest = _backward_working_memory(ops, 2048, d, v, with_rows)
    grad_hidden_bytes = (2 if with_rows else 1) * 2048 * d * 2
    assert largest <= grad_hidden_bytes, f"a {largest}-byte tensor, larger than the returned grad_hidden"
    per_token = 64  # labels mask, coefficients, lse slices, row indices: a few bytes a token
    assert big - small <= (2048 - 256) * per_token, (
        f"working memory grows with tokens: {small} bytes at 256 tokens, {big} at 2048")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_forward_keeps_no_copy_of_the_used_rows(backend):
    """Prompt-heavy input (3 of 4 rows ignored): what the forward leaves alive for the backward is
    O(tokens) numbers (row ids, labels, lse, log-probs), not a gathered [M, D] copy of hidden."""
    n, d, v = 512, 96, 300
    inp = make_inputs(n, d, v, ignore_frac=0.0)
    labels = inp.labels.clone()
    labels[torch.arange(n) % 4 != 0] = -100
    h = inp.hidden.clone().requires_grad_(True)
    w = inp.weight.clone().requires_grad_(True)
    with _LiveBytes() as mem:
        out = linear_logprobs(h, w, labels, backend=backend)
    kept_alive = mem.live  # the forward's allocations still referenced: output + saved tensors
    assert kept_alive <= n * 32, f"{kept_alive} bytes outlive the forward (a gathered [M, D] copy is {n // 4 * d * 4})"
    out.sum().backward()
    assert (h.grad[labels == -100] == 0).all() and h.grad[labels != -100].abs().sum() > 0


# ----------------------------------------------------------------------------- UPO_LOGITS=input
def _rounded_logit_logprobs(inp, dtype):
    """float64 log-probs of logits first rounded to ``dtype`` (what the naive 16-bit path sees)."""
    z = (inp.hidden.double() @ inp.weight.double().t()).to(dtype).double()
    keep = inp.labels != -100
    lp = z.log_softmax(-1).gather(-1, torch.where(keep, inp.labels, 0)[:, None])[:, 0]
    return torch.where(keep, lp, torch.zeros_like(lp))


@pytest.mark.parametrize("impl", ["fused", "cublas"])
def test_input_dtype_logits_match_the_rounded_softmax(monkeypatch, impl):
    """fp16 (the interpreter's tl.dot is exact for it; bf16 is not): with UPO_LOGITS=input both
    forwards compute the softmax of logits rounded to fp16, like the naive fp16 path, and the
    gradients meet the naive-16-bit rule."""
    monkeypatch.setenv("UPO_FWD_IMPL", impl)
    monkeypatch.setenv("UPO_LOGITS", "input")
    seed = new_seed()
    inp = make_inputs(96, 40, 509, dtype=torch.float16, seed=seed, ignore_frac=0.2)
    with poison_outputs():
        logp = linear_logprobs(inp.hidden, inp.weight, inp.labels, backend="triton", chunk_tokens=40,
                               chunk_vocab=200)
    rounded = _rounded_logit_logprobs(inp, torch.float16)
    exact = reference_token_outputs(inp, torch.zeros(96))[0]
    # rounded logits: agree with the rounded softmax (up to rare one-ulp differences of the
    # accumulation order), and differ from the exact one by the rounding itself
    assert rel_err(logp, rounded) < 2e-4, f"vs rounded softmax: {rel_err(logp, rounded):.2e} (seed={seed})"
    assert rel_err(logp, rounded) < 0.5 * rel_err(rounded, exact), f"not the rounded softmax (seed={seed})"
    check_no_worse_than_naive(functools.partial(linear_logprobs, chunk_tokens=40, chunk_vocab=200), inp, "triton")


def test_logits_mode_is_fixed_at_forward_time(monkeypatch):
    """The backward reuses the forward's UPO_LOGITS / UPO_FWD_IMPL even if the environment changes."""
    monkeypatch.setenv("UPO_FWD_IMPL", "cublas")
    inp = make_inputs(50, 24, 301, dtype=torch.float16, ignore_frac=0.2)
    up = torch.randn(50)

    def grads(switch_before_backward):
        monkeypatch.setenv("UPO_LOGITS", "input")
        h = inp.hidden.clone().requires_grad_(True)
        out = linear_logprobs(h, inp.weight, inp.labels, backend="triton")
        if switch_before_backward:
            monkeypatch.setenv("UPO_LOGITS", "fp32")
        out.backward(up)
        return h.grad

    assert torch.equal(grads(False), grads(True))
    monkeypatch.setenv("UPO_LOGITS", "bf16")
    with pytest.raises(ValueError, match="UPO_LOGITS"):
        _ops().logits_mode()
