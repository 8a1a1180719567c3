"""Per-token fused linear log-probs (every backend) against the float64 oracle.

Backends: ``torch`` (chunked PyTorch) and ``triton`` (under ``TRITON_INTERPRET=1`` on CPU, so
fp32 inputs only and small sizes). Every kernel call runs inside ``poison_outputs()`` so any
element a kernel forgets to write is NaN and fails the finiteness checks.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from upo_kernels import linear_logprobs, logprobs_from_logits  # captured before any submodule import
from helpers import (TOL_GRAD, TOL_OUT, assert_close_rel, check_no_worse_than_naive, check_split_passes, gen, leaf,
                     make_inputs,
                     new_seed, reference_floors, reference_token_outputs, rel_err, run_token_fn)
from upo_kernels.buffers import poison_outputs
from upo_kernels.backends import TorchOps  # the chunked backend as functional.py dispatches to it

ON_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if ON_CUDA else "cpu"
BACKENDS = ["torch", "triton"]

# (id, kwargs for make_inputs, kwargs for the kernel)
CASES = [
    ("odd_flat_bias", dict(n=47, d=72, v=1003, bias=True, ignore_frac=0.25), {}),
    ("odd_2d_scale_cap", dict(n=None, lead_shape=(3, 17), d=72, v=1003, ignore_frac=0.3),
     dict(logit_scale=0.5, softcap=4.0)),
    ("cap_bias_scale", dict(n=29, d=40, v=300, bias=True, ignore_frac=0.1), dict(logit_scale=2.0, softcap=5.0)),
    ("scale_only_3d", dict(n=None, lead_shape=(2, 3, 5), d=16, v=67, ignore_frac=0.2), dict(logit_scale=1.7)),
    ("tiny_v5_d3_n1", dict(n=1, d=3, v=5, ignore_frac=0.0), {}),
    ("v2_d1_bias", dict(n=9, d=1, v=2, bias=True, ignore_frac=0.2), {}),
    ("all_ignored", dict(n=11, d=8, v=37, ignore_frac=1.0, bias=True), {}),
    ("ignore_index_minus1", dict(n=23, d=24, v=129, ignore_frac=0.3, ignore_index=-1), dict(ignore_index=-1)),
]


def _check_against_reference(backend, inp, kern_kwargs, tol_out=TOL_OUT, tol_grad=TOL_GRAD):
    seed = inp.seed
    g = gen(seed + 1)
    upstream = torch.randn(inp.labels.shape, generator=g).to(inp.hidden.device)
    ignore_index = kern_kwargs.get("ignore_index", -100)
    ref_out, ref_gh, ref_gw, ref_gb = reference_token_outputs(inp, upstream, **kern_kwargs)
    fl = reference_floors(inp, upstream, **kern_kwargs)
    out, gh, gw, gb = run_token_fn(linear_logprobs, inp, upstream, backend=backend, **kern_kwargs)

    assert out.dtype == torch.float32, f"log-probs dtype {out.dtype}, want float32"
    assert out.shape == inp.labels.shape, f"log-probs shape {tuple(out.shape)} != labels {tuple(inp.labels.shape)}"
    ignored = inp.labels == ignore_index
    assert torch.isfinite(out).all(), f"non-finite log-probs (seed={seed})"
    assert (out[ignored] == 0).all(), f"ignored tokens must give exactly 0 (seed={seed})"
    assert (out[~ignored] <= 1e-6).all(), f"log-probs must be <= 0 (seed={seed})"
    assert_close_rel(out, ref_out, tol_out, "log-probs", seed, fl["out"])

    assert gh.dtype == inp.hidden.dtype and gh.shape == inp.hidden.shape
    assert gw.dtype == inp.weight.dtype and gw.shape == inp.weight.shape
    assert_close_rel(gh, ref_gh, tol_grad, "grad_hidden", seed, fl["gh"])
    assert (gh[ignored] == 0).all(), f"ignored tokens must get exactly zero grad_hidden (seed={seed})"
    assert_close_rel(gw, ref_gw, tol_grad, "grad_weight", seed, fl["gw"])
    if inp.bias is not None:
        assert gb is not None and gb.shape == inp.bias.shape and gb.dtype == inp.bias.dtype
        assert_close_rel(gb, ref_gb, tol_grad, "grad_bias", seed, fl["gb"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_linear_logprobs_vs_reference(backend, case):
    _, mk, kern_kwargs = case
    seed = new_seed()
    print(f"seed={seed}")
    mk = dict(mk)
    inp = make_inputs(mk.pop("n"), mk.pop("d"), mk.pop("v"), seed=seed, device=DEVICE, **mk)
    _check_against_reference(backend, inp, kern_kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_leading_dims_same_as_flat(backend):
    """[R, T] input gives the same numbers as the flattened [R*T] input."""
    seed = new_seed()
    inp = make_inputs(None, 20, 211, lead_shape=(3, 13), bias=True, seed=seed, device=DEVICE)
    up = torch.randn(inp.labels.shape, generator=gen(seed + 1)).to(DEVICE)
    out2, gh2, gw2, gb2 = run_token_fn(linear_logprobs, inp, up, backend=backend, softcap=6.0)
    flat = type(inp)(inp.hidden.reshape(-1, 20), inp.weight, inp.labels.reshape(-1), inp.bias, seed)
    out1, gh1, gw1, gb1 = run_token_fn(linear_logprobs, flat, up.reshape(-1), backend=backend,
                                       softcap=6.0)
    assert out2.shape == (3, 13) and out1.shape == (39,)
    assert rel_err(out2.reshape(-1), out1) < 1e-6, f"seed={seed}"
    assert rel_err(gh2.reshape(-1, 20), gh1) < 1e-6, f"seed={seed}"
    assert rel_err(gw2, gw1) < 1e-6, f"seed={seed}"
    assert rel_err(gb2, gb1) < 1e-6, f"seed={seed}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_only_hidden_and_no_grad(backend):
    """Frozen weight (no grad) and a no-grad forward (the reference-model pass) both work."""
    seed = new_seed()
    inp = make_inputs(31, 24, 157, seed=seed, device=DEVICE, bias=True)
    up = torch.randn(31, generator=gen(seed + 1)).to(DEVICE)
    ref_out, ref_gh, _, _ = reference_token_outputs(inp, up)
    fl = reference_floors(inp, up)
    h = leaf(inp.hidden)
    with poison_outputs():
        out = linear_logprobs(h, inp.weight, inp.labels, bias=inp.bias, backend=backend)
        out.backward(up)
    assert_close_rel(out.detach(), ref_out, TOL_OUT, "log-probs (frozen weight)", seed, fl["out"])
    assert_close_rel(h.grad, ref_gh, TOL_GRAD, "grad_hidden (frozen weight)", seed, fl["gh"])
    with torch.no_grad(), poison_outputs():
        out_ng = linear_logprobs(inp.hidden, inp.weight, inp.labels, bias=inp.bias, backend=backend)
    assert not out_ng.requires_grad
    assert_close_rel(out_ng, ref_out, TOL_OUT, "log-probs (no_grad)", seed, fl["out"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_only_weight_and_bias(backend):
    """Hidden states without grad (the LM head trained alone): weight and bias grads still exact."""
    seed = new_seed()
    inp = make_inputs(37, 24, 157, seed=seed, device=DEVICE, bias=True, ignore_frac=0.3)
    up = torch.randn(37, generator=gen(seed + 1)).to(DEVICE)
    _, _, ref_gw, ref_gb = reference_token_outputs(inp, up)
    fl = reference_floors(inp, up)
    w, b = leaf(inp.weight), leaf(inp.bias)
    with poison_outputs():
        linear_logprobs(inp.hidden, w, inp.labels, bias=b, backend=backend, chunk_tokens=16).backward(up)
    assert_close_rel(w.grad, ref_gw, TOL_GRAD, "grad_weight (frozen hidden)", seed, fl["gw"])
    assert_close_rel(b.grad, ref_gb, TOL_GRAD, "grad_bias (frozen hidden)", seed, fl["gb"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_input(backend):
    """N = 0 tokens: an empty result (and zero grads), or a clear ValueError; never a crash elsewhere."""
    hidden = torch.zeros(0, 8, device=DEVICE, requires_grad=True)
    weight = torch.randn(17, 8, device=DEVICE, requires_grad=True)
    labels = torch.zeros(0, dtype=torch.long, device=DEVICE)
    try:
        with poison_outputs():
            out = linear_logprobs(hidden, weight, labels, backend=backend)
    except ValueError as e:
        assert "hidden" in str(e) or "labels" in str(e) or "empty" in str(e), str(e)
        return
    assert out.shape == (0,) and out.dtype == torch.float32
    out.sum().backward()
    assert weight.grad is None or (weight.grad == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", ["weight_transposed_view", "hidden_strided_slice", "hidden_column_slice"])
def test_noncontiguous_inputs(backend, which):
    """Non-contiguous views are either handled correctly or refused with a clear ValueError."""
    seed = new_seed()
    inp = make_inputs(19, 24, 101, seed=seed, device=DEVICE, bias=True)
    hidden, weight = inp.hidden, inp.weight
    if which == "weight_transposed_view":
        weight = weight.t().contiguous().t()  # same values, strides (1, V)
        name = "weight"
    elif which == "hidden_strided_slice":
        big = torch.zeros(38, 24, device=DEVICE)
        big[::2] = hidden
        hidden = big[::2]  # row stride 48
        name = "hidden"
    else:
        big = torch.zeros(19, 40, device=DEVICE)
        big[:, 5:29] = hidden
        hidden = big[:, 5:29]  # row stride 40, offset 5
        name = "hidden"
    assert not (hidden.is_contiguous() and weight.is_contiguous())
    up = torch.randn(19, generator=gen(seed + 1)).to(DEVICE)
    ref_out, ref_gh, ref_gw, _ = reference_token_outputs(inp, up)
    fl = reference_floors(inp, up)
    h = hidden.detach().requires_grad_(True)  # keep the view's strides
    w = weight.detach().requires_grad_(True)
    try:
        with poison_outputs():
            out = linear_logprobs(h, w, inp.labels, bias=inp.bias, backend=backend)
    except ValueError as e:
        assert name in str(e) or "contiguous" in str(e), f"unclear error for non-contiguous {name}: {e}"
        return
    assert_close_rel(out.detach(), ref_out, TOL_OUT, f"log-probs ({which})", seed, fl["out"])
    out.backward(up)
    assert_close_rel(h.grad, ref_gh, TOL_GRAD, f"grad_hidden ({which})", seed, fl["gh"])
    assert_close_rel(w.grad, ref_gw, TOL_GRAD, f"grad_weight ({which})", seed, fl["gw"])


@pytest.mark.skipif(ON_CUDA, reason="CPU-only check of the auto dispatch")
def test_auto_is_torch_on_cpu():
    seed = new_seed()
    inp = make_inputs(33, 16, 97, seed=seed, bias=True)
    up = torch.randn(33, generator=gen(seed + 1))
    a = run_token_fn(linear_logprobs, inp, up, backend="auto")
    t = run_token_fn(linear_logprobs, inp, up, backend="torch")
    for x, y, name in zip(a, t, ["out", "grad_hidden", "grad_weight", "grad_bias"]):
        assert torch.equal(x, y), f"auto on CPU should be the torch backend ({name} differs)"


# ----------------------------------------------------------------------------- chunked internals
@pytest.mark.parametrize("chunks", [(7, 13), (1, 1), (5, 1000), (64, 3)])
@pytest.mark.parametrize("cap", [None, 3.0])
def test_chunked_ragged_chunks(chunks, cap):
    """Chunk sizes that leave ragged last chunks in both dims (and the 1x1 extreme)."""
    seed = new_seed()
    inp = make_inputs(23, 11, 61, seed=seed, bias=True, ignore_frac=0.3)
    check_split_passes(TorchOps, inp, seed, scale=1.3, cap=cap, chunk_tokens=chunks[0], chunk_vocab=chunks[1])


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(n=st.integers(1, 40), d=st.integers(1, 33), v=st.integers(2, 300), ct=st.integers(1, 50),
       cv=st.integers(1, 400), ignore=st.sampled_from([0.0, 0.5, 1.0]), bias=st.booleans(),
       scale=st.sampled_from([1.0, 0.3, 2.5]), cap=st.sampled_from([None, 2.0, 30.0]),
       seed=st.integers(0, 2**31 - 1))
def test_chunked_property(n, d, v, ct, cv, ignore, bias, scale, cap, seed):
    inp = make_inputs(n, d, v, seed=seed, bias=bias, ignore_frac=ignore)
    check_split_passes(TorchOps, inp, seed, scale=scale, cap=cap, chunk_tokens=ct, chunk_vocab=cv)


# ----------------------------------------------------------------------------- bf16 (CPU, torch backend)
@pytest.mark.skipif(ON_CUDA, reason="the GPU file covers bf16 on CUDA")
def test_bf16_no_worse_than_naive_cpu():
    """bf16 inputs (torch backend): |ours - ref| <= |naive bf16 - ref| + tol for log-probs and grads."""
    inp = make_inputs(256, 64, 3001, dtype=torch.bfloat16, ignore_frac=0.2)
    check_no_worse_than_naive(linear_logprobs, inp, "torch")


@pytest.mark.skipif(ON_CUDA, reason="the GPU file covers bf16 on CUDA")
@pytest.mark.parametrize("cap", [None, 4.0])
def test_triton_backward_bf16_interpreter(cap):
    """The triton backward (host code + epilogue; no tl.dot, so bf16 is valid in the interpreter) with bf16
    inputs: grads no worse than the naive bf16 path (docs/kernels.md, numerical contract).

    On CPU ``torch.mm(..., out_dtype=float32)`` does not exist, so this runs the fallback that rounds the
    recomputed logits to bf16 -- the path torch builds without that overload take on CUDA too.
    lse comes from the chunked forward (the triton forward's bf16 tl.dot is not interpretable)."""
    from upo_kernels import chunked, triton_ops
    seed = new_seed()
    inp = make_inputs(160, 24, 301, dtype=torch.bfloat16, ignore_frac=0.25, seed=seed, bias=True)
    up = torch.randn(160, generator=gen(seed + 1))
    _, ref_gh, ref_gw, ref_gb = reference_token_outputs(inp, up, logit_scale=0.8, softcap=cap)
    _, lse = chunked.linear_logprobs_forward(inp.hidden, inp.weight, inp.labels, inp.bias, 0.8, cap, -100)
    with poison_outputs():
        gh, gw, gb = triton_ops.backward(up, inp.hidden, inp.weight, inp.labels, lse.float(), inp.bias, 0.8, cap,
                                         -100, chunk_vocab=97)
    # naive bf16: bf16 logits (then the same scale/cap in fp32), autograd
    h, w, b = leaf(inp.hidden), leaf(inp.weight), leaf(inp.bias)
    z = (torch.addmm(b, h, w.t())).float() * 0.8
    if cap is not None:
        z = cap * torch.tanh(z / cap)
    keep = inp.labels != -100
    lp = z.log_softmax(-1).gather(-1, torch.where(keep, inp.labels, 0)[:, None])[:, 0] * keep
    lp.backward(up)
    for name, ours, nv, ref in [("grad_hidden", gh, h.grad, ref_gh), ("grad_weight", gw, w.grad, ref_gw),
                                ("grad_bias", gb, b.grad, ref_gb)]:
        assert ours is not None and torch.isfinite(ours).all(), f"{name} (seed={seed})"
        e_ours = (ours.double() - ref).norm().item()
        e_naive = (nv.double() - ref).norm().item()
        tol = 2e-4 * ref.norm().item()
        assert e_ours <= e_naive + tol, f"{name}: ours {e_ours:.3e} > naive {e_naive:.3e} + {tol:.1e} (seed={seed})"


# ----------------------------------------------------------------------------- backend availability
def test_triton_backend_on_cpu_without_interpreter_raises_clearly():
    code = textwrap.dedent("""
        import torch, upo_kernels
        h = torch.randn(4, 8); w = torch.randn(16, 8); y = torch.randint(0, 16, (4,))
        try:
            upo_kernels.linear_logprobs(h, w, y, backend="triton")
        except Exception as e:
            print("EXC", type(e).__name__, str(e).replace("\\n", " "))
        else:
            print("NOEXC")
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "UPO_TEST_GPU")}
    env["TRITON_INTERPRET"] = "0"
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                         env.get("PYTHONPATH", "")])
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith(("EXC", "NOEXC"))]
    assert lines, f"subprocess failed: {res.stderr[-2000:]}"
    line = lines[-1]
    assert line.startswith("EXC"), "backend='triton' on CPU tensors without the interpreter must raise"
    _, kind, msg = line.split(" ", 2)
    assert kind in ("ValueError", "RuntimeError"), f"unexpected exception type {kind}: {msg}"
    assert "TRITON_INTERPRET" in msg or "cuda" in msg.lower(), f"unclear error: {msg}"


def _run_py(code, interpret):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "UPO_TEST_GPU")}
    env["TRITON_INTERPRET"] = "1" if interpret else "0"
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                         env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=120)


def test_public_names_survive_triton_backend():
    """``upo_kernels.linear_logprobs`` must stay the function after the triton backend was used.

    (A submodule named ``upo_kernels/linear_logprobs.py`` rebinds the package attribute to the module
    the first time it is imported.)
    """
    res = _run_py("""
        import torch, upo_kernels
        h = torch.randn(4, 8); w = torch.randn(16, 8); y = torch.randint(0, 16, (4,))
        upo_kernels.linear_logprobs(h, w, y, backend="triton")
        upo_kernels.logprobs_from_logits(torch.randn(4, 16), y, backend="triton")
        print("TYPES", type(upo_kernels.linear_logprobs).__name__, type(upo_kernels.logprobs_from_logits).__name__)
        import upo
        print("FUSED", type(upo.fused.linear_logprobs).__name__)
    """, interpret=True)
    assert "TYPES" in res.stdout, res.stderr[-3000:]
    assert "TYPES function function" in res.stdout, res.stdout
    assert "FUSED function" in res.stdout, res.stdout


def test_bad_backend_name():
    inp = make_inputs(4, 8, 16)
    with pytest.raises(ValueError, match="backend"):
        linear_logprobs(inp.hidden, inp.weight, inp.labels, backend="cuda-fast")


# ----------------------------------------------------------------------------- logprobs_from_logits
LOGIT_CASES = [("2d_odd", (3, 17), 1003), ("flat", (29,), 130), ("tiny", (1,), 5), ("3d", (2, 2, 5), 67)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", LOGIT_CASES, ids=[c[0] for c in LOGIT_CASES])
def test_logprobs_from_logits_vs_reference(backend, case):
    _, shape, v = case
    seed = new_seed()
    g = gen(seed)
    logits = (torch.randn(*shape, v, generator=g) * 3).to(DEVICE)
    labels = torch.randint(0, v, shape, generator=g)
    labels[torch.rand(shape, generator=g) < 0.3] = -100
    labels = labels.to(DEVICE)
    up = torch.randn(shape, generator=g).to(DEVICE)

    zr = logits.double().requires_grad_(True)
    keep = labels != -100
    ref = torch.log_softmax(zr, -1).gather(-1, torch.where(keep, labels, 0).unsqueeze(-1)).squeeze(-1) * keep
    ref.backward(up.double())

    z = logits.clone().requires_grad_(True)
    with poison_outputs():
        out = logprobs_from_logits(z, labels, backend=backend)
        out.backward(up)
    assert out.shape == labels.shape and out.dtype == torch.float32
    assert (out.detach()[~keep] == 0).all()
    # floors: natural magnitudes (||lse|| for log-probs, ||g|| for the logit grads), see helpers.rel_err
    lse = torch.logsumexp(logits.double(), -1)[keep]
    assert_close_rel(out.detach(), ref.detach(), TOL_OUT, "log-probs", seed, 0.1 * lse.norm().item())
    assert_close_rel(z.grad, zr.grad, TOL_GRAD, "grad_logits", seed, 0.1 * up[keep].norm().item())
    assert (z.grad[~keep] == 0).all(), "ignored rows must get zero gradient"
