"""CUDA checks: fp32 against the float64 oracle, bf16 against the naive bf16 path, and peak memory.

Every test is marked ``gpu`` and skipped without CUDA. fp32: rel. error < 1e-5 (log-probs, losses)
and < 1e-4 (grads); the Triton kernels promise IEEE fp32 dots for fp32 inputs, and TF32 is switched
off for cuBLAS here. bf16: the Cut Cross-Entropy rule ``|ours - ref| <= |naive_bf16 - ref| + tol`` (in
norm), naive = ``(h @ W.T)`` in bf16, ``.float().log_softmax(-1)``, gather, grads by autograd.
Both Triton forwards (``UPO_FWD_IMPL=fused|cublas``) run the fp32 and bf16 checks; the bf16
backward also runs with several token groups and with bf16-rounded logits (``UPO_LOGITS=input``),
and with bias, logit scale and softcap in both logit modes, so every kernel variant compiles here
(benchmarks/gpu_core.sh runs this file first on a GPU). Token statistics: both backends and both
forwards, fp32 and bf16, against float64.
Memory: peak extra memory of the fused forward+backward is < 5% of the naive path's at
N=8192, D=2048, V=128256 and <= 1% at the headline N=16384, D=4096, V=128256 (bf16).
The first-use check (upo_kernels/first_use_check.py) must pass every configuration here: a warning is an
error, since its fallback to the torch backend would hide the kernels under test.
Budget: about a minute on one H100.
"""
from __future__ import annotations

import functools
import warnings

import pytest
import torch

import upo
from conftest import requires_cuda
from helpers import (TOL_GRAD, TOL_OUT, assert_close_rel, check_no_worse_than_naive, check_stats, gen, leaf,
                     make_inputs, make_pref_batch, new_seed, reference_floors, reference_token_outputs, run_token_fn,
                     stats_inputs)
from upo_kernels import TOKEN_STATS, first_use_check, linear_logprobs, logprobs_from_logits, reference
from upo_kernels.buffers import poison_outputs

pytestmark = [pytest.mark.gpu, requires_cuda]

BACKENDS = ["triton", "torch"]


@pytest.fixture(autouse=True)
def _no_tf32():
    """fp32 contract: cuBLAS must not silently use TF32 (the torch backend and the triton backward use it)."""
    prev = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = prev


@pytest.fixture(autouse=True)
def _kernel_check_is_an_error():
    with warnings.catch_warnings():
        warnings.simplefilter("error", first_use_check.KernelCheckWarning)
        yield


@pytest.fixture(params=["fused", "cublas"])
def fwd_impl(request, monkeypatch):
    """The Triton backend's two forwards (read from the environment at each call)."""
    monkeypatch.setenv("UPO_FWD_IMPL", request.param)
    return request.param


# ----------------------------------------------------------------------------- fp32 vs float64
FP32_CASES = [
    ("odd", dict(n=1031, d=264, v=4099, bias=True, ignore_frac=0.25), {}),
    ("2d_cap_scale", dict(n=None, lead_shape=(5, 77), d=192, v=2053, ignore_frac=0.3),
     dict(logit_scale=0.6, softcap=5.0)),
    ("tiny", dict(n=1, d=3, v=5, ignore_frac=0.0), {}),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", FP32_CASES, ids=[c[0] for c in FP32_CASES])
def test_fp32_vs_reference_cuda(backend, case, fwd_impl):
    if backend == "torch" and fwd_impl == "cublas":
        pytest.skip("UPO_FWD_IMPL selects the triton backend's forward only")
    _, mk, kern = case
    mk = dict(mk)
    seed = new_seed()
    inp = make_inputs(mk.pop("n"), mk.pop("d"), mk.pop("v"), seed=seed, device="cuda", **mk)
    up = torch.randn(inp.labels.shape, generator=gen(seed + 1)).cuda()
    ref_out, ref_gh, ref_gw, ref_gb = reference_token_outputs(inp, up, **kern)
    fl = reference_floors(inp, up, **kern)
    out, gh, gw, gb = run_token_fn(linear_logprobs, inp, up, backend=backend, **kern)
    assert out.dtype == torch.float32 and out.shape == inp.labels.shape and out.is_cuda
    ignored = inp.labels == -100
    assert (out[ignored] == 0).all()
    assert_close_rel(out, ref_out, TOL_OUT, "log-probs", seed, fl["out"])
    assert_close_rel(gh, ref_gh, TOL_GRAD, "grad_hidden", seed, fl["gh"])
    assert (gh[ignored] == 0).all()
    assert_close_rel(gw, ref_gw, TOL_GRAD, "grad_weight", seed, fl["gw"])
    if inp.bias is not None:
        assert_close_rel(gb, ref_gb, TOL_GRAD, "grad_bias", seed, fl["gb"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("logits", ["fp32", "input"])
def test_first_use_check_passes_every_configuration(fwd_impl, logits, dtype, monkeypatch):
    """Each configuration's first call checked afresh: with and without statistics, plain and with bias, logit
    scale and softcap; every verdict a pass (a failing one raises its warning here)."""
    monkeypatch.setenv("UPO_LOGITS", logits)
    monkeypatch.setattr(first_use_check, "_verdicts", {})
    inp = make_inputs(300, 256, 5003, dtype=dtype, device="cuda", bias=True, ignore_frac=0.2)
    for stats in ((), TOKEN_STATS):
        linear_logprobs(inp.hidden, inp.weight, inp.labels, backend="triton", stats=stats)
        linear_logprobs(inp.hidden, inp.weight, inp.labels, bias=inp.bias, backend="triton", stats=stats,
                        logit_scale=0.8, softcap=30.0)
    assert len(first_use_check._verdicts) == 4 and all(first_use_check._verdicts.values())


def test_auto_is_triton_on_cuda():
    seed = new_seed()
    inp = make_inputs(300, 64, 1001, seed=seed, device="cuda")
    up = torch.randn(300, generator=gen(seed)).cuda()
    a = run_token_fn(linear_logprobs, inp, up, backend="auto")
    t = run_token_fn(linear_logprobs, inp, up, backend="triton")
    assert torch.equal(a[0], t[0]) and torch.equal(a[1], t[1])


@pytest.mark.parametrize("which", ["weight_transposed_view", "hidden_strided_slice"])
def test_noncontiguous_triton_cuda(which):
    seed = new_seed()
    inp = make_inputs(257, 96, 1003, seed=seed, device="cuda")
    up = torch.randn(257, generator=gen(seed)).cuda()
    ref_out, ref_gh, ref_gw, _ = reference_token_outputs(inp, up)
    fl = reference_floors(inp, up)
    h, w = inp.hidden, inp.weight
    if which == "weight_transposed_view":
        w = w.t().contiguous().t()
    else:
        big = torch.zeros(257, 160, device="cuda")
        big[:, 7:103] = h
        h = big[:, 7:103]
    h = h.detach().requires_grad_(True)
    w = w.detach().requires_grad_(True)
    try:
        with poison_outputs():
            out = linear_logprobs(h, w, inp.labels, backend="triton")
    except ValueError as e:
        assert "contiguous" in str(e) or "hidden" in str(e) or "weight" in str(e), str(e)
        return
    out.backward(up)
    assert_close_rel(out.detach(), ref_out, TOL_OUT, "log-probs", seed, fl["out"])
    assert_close_rel(h.grad, ref_gh, TOL_GRAD, "grad_hidden", seed, fl["gh"])
    assert_close_rel(w.grad, ref_gw, TOL_GRAD, "grad_weight", seed, fl["gw"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_logprobs_from_logits_cuda(backend):
    seed = new_seed()
    g = gen(seed)
    logits = (torch.randn(3, 211, 32003, generator=g) * 3).cuda()
    labels = torch.randint(0, 32003, (3, 211), generator=g)
    labels[torch.rand(3, 211, generator=g) < 0.2] = -100
    labels = labels.cuda()
    up = torch.randn(3, 211, generator=g).cuda()
    keep = labels != -100
    zr = logits.double().requires_grad_(True)
    ref = torch.log_softmax(zr, -1).gather(-1, torch.where(keep, labels, 0)[..., None])[..., 0] * keep
    ref.backward(up.double())
    z = logits.clone().requires_grad_(True)
    with poison_outputs():
        out = logprobs_from_logits(z, labels, backend=backend)
        out.backward(up)
    lse = torch.logsumexp(logits.double(), -1)[keep]
    assert_close_rel(out.detach(), ref.detach(), TOL_OUT, "log-probs", seed, 0.1 * lse.norm().item())
    assert_close_rel(z.grad, zr.grad, TOL_GRAD, "grad_logits", seed, 0.1 * up[keep].norm().item())


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_loss_cuda_vs_reference(backend):
    """fused_loss (sigmoid + upo, padded, bias, softcap) on CUDA vs upo.loss over float64 reference sums."""
    seed = new_seed()
    b = make_pref_batch(4, 96, 128, 4099, bias=True, seed=seed, device="cuda")
    gk = gen(seed + 7)
    loss_kw = dict(loss_type=["sigmoid", "upo"], loss_weights=[1.0, 0.5], beta=0.1,
                   aux_rewards_chosen=torch.randn(4, 2, generator=gk).cuda(),
                   aux_rewards_rejected=torch.randn(4, 2, generator=gk).cuda())
    with torch.no_grad():
        r, _ = reference.reference_sequence_logprobs(b.ref_hidden, b.weight, b.labels, b.bias, softcap=20.0)
    h64, w64, b64 = leaf(b.hidden, torch.float64), leaf(b.weight, torch.float64), leaf(b.bias, torch.float64)
    s, n = reference.reference_sequence_logprobs(h64, w64, b.labels, b64, softcap=20.0)
    ref = upo.loss(s[:4], s[4:], r[:4], r[4:], chosen_lengths=n[:4], rejected_lengths=n[4:], **loss_kw)
    ref.loss.backward()
    h, w, bb = leaf(b.hidden), leaf(b.weight), leaf(b.bias)
    with poison_outputs():
        out = upo.fused_loss(h, w, b.labels, bias=bb, ref_chosen_logps=r[:4].float(), ref_rejected_logps=r[4:].float(),
                             softcap=20.0, backend=backend, **loss_kw)
        out.loss.backward()
    assert_close_rel(out.loss.detach(), ref.loss.detach(), TOL_OUT, "loss", seed)
    assert_close_rel(out.losses.detach(), ref.losses.detach(), TOL_OUT, "losses", seed)
    assert_close_rel(h.grad, h64.grad, TOL_GRAD, "grad_hidden", seed)
    assert_close_rel(w.grad, w64.grad, TOL_GRAD, "grad_weight", seed)
    assert_close_rel(bb.grad, b64.grad, TOL_GRAD, "grad_bias", seed)


def test_device_mismatch_cuda():
    inp = make_inputs(8, 16, 33, device="cuda")
    with pytest.raises(ValueError, match="labels|hidden"):
        linear_logprobs(inp.hidden, inp.weight, inp.labels.cpu())
    with pytest.raises(ValueError, match="weight|hidden"):
        linear_logprobs(inp.hidden, inp.weight.cpu(), inp.labels)
    b = make_pref_batch(2, 8, 16, 33, device="cuda")
    with pytest.raises(ValueError, match="labels|hidden"):
        upo.fused_loss(b.hidden, b.weight, b.labels.cpu(), loss_type="simpo")


# ----------------------------------------------------------------------------- token statistics
STATS_CASES = [
    ("odd_bias", dict(n=1031, d=264, v=4099, bias=True, ignore_frac=0.25), {}),
    ("scale_cap", dict(n=517, d=192, v=2053, ignore_frac=0.2), dict(logit_scale=0.6, softcap=5.0)),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", STATS_CASES, ids=[c[0] for c in STATS_CASES])
def test_token_stats_cuda(backend, case, dtype, fwd_impl):
    """Every token statistic (the compiled constexpr branches of both Triton forwards) against
    float64 on the same (fp32 or bf16) inputs: the logit tiles are fp32 either way."""
    if backend == "torch" and fwd_impl == "cublas":
        pytest.skip("UPO_FWD_IMPL selects the triton backend's forward only")
    _, mk, kern = case
    mk = dict(mk)
    seed = new_seed()
    inp = stats_inputs(mk.pop("n"), mk.pop("d"), mk.pop("v"), seed, logit_kw=kern, dtype=dtype, device="cuda", **mk)
    with torch.no_grad(), poison_outputs():
        out = linear_logprobs(inp.hidden, inp.weight, inp.labels, bias=inp.bias, backend=backend,
                              stats=TOKEN_STATS, **kern)
    z = reference.reference_logits(inp.hidden, inp.weight, inp.bias, **kern)
    ref = reference.reference_token_stats(inp.hidden, inp.weight, inp.labels, inp.bias, **kern)
    check_stats(out.stats, ref, z, inp.labels, TOKEN_STATS, f"{backend}/{fwd_impl}/{dtype}", seed,
                tol=1e-5 if dtype == torch.float32 else 1e-4)


def test_token_stats_input_logits_cuda(fwd_impl, monkeypatch):
    """UPO_LOGITS=input (bf16 logit tiles) with every statistic: compiles and stays close to the
    statistics of the bf16-rounded logits (one bf16 ulp of a logit apart at most)."""
    monkeypatch.setenv("UPO_LOGITS", "input")
    seed = new_seed()
    inp = stats_inputs(1031, 264, 4099, seed, dtype=torch.bfloat16, device="cuda", ignore_frac=0.2)
    with torch.no_grad(), poison_outputs():
        out = linear_logprobs(inp.hidden, inp.weight, inp.labels, backend="triton", stats=TOKEN_STATS)
    rounded = (inp.hidden.double() @ inp.weight.double().t()).bfloat16().double()
    ref = reference.reference_stats_from_logits(rounded, inp.labels)
    check_stats(out.stats, ref, rounded, inp.labels, TOKEN_STATS, f"input logits/{fwd_impl}", seed, tol=1e-2)


# ----------------------------------------------------------------------------- bf16 vs naive bf16
@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_no_worse_than_naive_32k(backend):
    inp = make_inputs(4096, 1024, 32003, dtype=torch.bfloat16, device="cuda", ignore_frac=0.2)
    check_no_worse_than_naive(linear_logprobs, inp, backend)


def test_bf16_no_worse_than_naive_128k(fwd_impl):
    inp = make_inputs(2048, 512, 128256, dtype=torch.bfloat16, device="cuda", ignore_frac=0.2)
    check_no_worse_than_naive(linear_logprobs, inp, "triton")


def test_bf16_input_logits_no_worse_than_naive(fwd_impl, monkeypatch):
    """UPO_LOGITS=input: logit tiles rounded to bf16 in both passes (the naive path's numerics)."""
    monkeypatch.setenv("UPO_LOGITS", "input")
    inp = make_inputs(4096, 1024, 32003, dtype=torch.bfloat16, device="cuda", ignore_frac=0.2)
    check_no_worse_than_naive(linear_logprobs, inp, "triton")


def test_bf16_token_groups_no_worse_than_naive(fwd_impl):
    """5 token groups: grad_weight is summed in bf16 over the groups' products (5 roundings)."""
    inp = make_inputs(4096, 1024, 32003, dtype=torch.bfloat16, device="cuda", ignore_frac=0.2)
    check_no_worse_than_naive(functools.partial(linear_logprobs, chunk_tokens=832), inp, "triton")


@pytest.mark.parametrize("logits", ["fp32", "input"])
def test_bf16_bias_scale_softcap_no_worse_than_naive(fwd_impl, logits, monkeypatch):
    """The remaining bf16 kernel variants: bias, logit scale and softcap through both forwards and
    both logit modes, with 3 token groups; the same rule against a naive bf16 path with the same head."""
    monkeypatch.setenv("UPO_LOGITS", logits)
    scale, cap = 0.8, 30.0
    inp = make_inputs(1000, 512, 32003, dtype=torch.bfloat16, device="cuda", ignore_frac=0.2, bias=True)
    up = torch.randn(1000, generator=gen(inp.seed + 1)).cuda()
    ref = reference_token_outputs(inp, up, logit_scale=scale, softcap=cap)
    ours = run_token_fn(functools.partial(linear_logprobs, chunk_tokens=384), inp, up, backend="triton",
                        logit_scale=scale, softcap=cap)
    h, w, b = leaf(inp.hidden), leaf(inp.weight), leaf(inp.bias)
    keep = inp.labels != -100
    z = (h @ w.t() + b).float() * scale
    z = cap * torch.tanh(z / cap)
    lp = z.log_softmax(-1).gather(-1, torch.where(keep, inp.labels, 0)[:, None])[:, 0]
    torch.where(keep, lp, torch.zeros_like(lp)).backward(up)
    naive = (lp.detach() * keep, h.grad, w.grad, b.grad)
    for name, o, nv, r in zip(("log-probs", "grad_hidden", "grad_weight", "grad_bias"), ours, naive, ref):
        assert torch.isfinite(o).all(), f"{name}: non-finite (seed={inp.seed})"
        e_ours, e_naive = (o.double() - r).norm().item(), (nv.double() - r).norm().item()
        tol = 2e-4 * r.norm().item()
        assert e_ours <= e_naive + tol, f"{name}: ours {e_ours:.3e} > naive {e_naive:.3e} + {tol:.1e} (seed={inp.seed})"


# ----------------------------------------------------------------------------- memory
def _peak_extra(fn, returned_bytes):
    """Peak memory allocated while ``fn`` runs, above what was allocated before, minus ``returned_bytes()``."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base - returned_bytes()


def _fused_and_naive_extra(n, d, v, ignore_frac):
    """Peak extra memory (bytes, returned grads excluded) of fused and naive bf16 fwd+bwd."""
    inp = make_inputs(n, d, v, dtype=torch.bfloat16, device="cuda", ignore_frac=ignore_frac)
    up = torch.randn(n, device="cuda")
    h, w = leaf(inp.hidden), leaf(inp.weight)

    def grads_bytes():
        return sum(t.grad.numel() * t.grad.element_size() for t in (h, w) if t.grad is not None)

    def fused():
        linear_logprobs(h, w, inp.labels, backend="triton").backward(up)

    def naive():
        keep = inp.labels != -100
        lp = (h @ w.t()).float().log_softmax(-1).gather(-1, torch.where(keep, inp.labels, 0)[:, None])[:, 0]
        torch.where(keep, lp, torch.zeros_like(lp)).backward(up)

    fused()  # warm-up: compile the kernels and allocate nothing that outlives the call
    h.grad = w.grad = None
    extra_fused = _peak_extra(fused, grads_bytes)
    h.grad = w.grad = None
    extra_naive = _peak_extra(naive, grads_bytes)
    h.grad = w.grad = None
    mb = 2**20
    print(f"peak extra at N={n} D={d} V={v}: fused {extra_fused / mb:.0f} MiB, naive {extra_naive / mb:.0f} MiB "
          f"({100 * extra_fused / extra_naive:.2f}%)")
    assert extra_naive > 4 * n * v, "naive path should hold at least one fp32 [N, V] tensor"
    return extra_fused, extra_naive


def test_peak_memory_fused_vs_naive():
    fused, naive = _fused_and_naive_extra(8192, 2048, 128256, ignore_frac=0.1)
    assert fused < 0.05 * naive, f"fused extra {fused / 2**20:.0f} MiB >= 5% of naive {naive / 2**20:.0f} MiB"


def test_peak_memory_headline_under_one_percent():
    """The issue's target: at N=16384, D=4096, V=128256 (bf16) the fused fwd+bwd's extra memory
    is <= 1% of the naive path's (grads excluded: every implementation returns them)."""
    fused, naive = _fused_and_naive_extra(16384, 4096, 128256, ignore_frac=0.0)
    assert fused <= 0.01 * naive, f"fused extra {fused / 2**20:.0f} MiB > 1% of naive {naive / 2**20:.0f} MiB"
