"""Each Triton kernel configuration checked once, on its first call, against the torch backend.

The Triton kernels' 16-bit paths cannot run under the interpreter (its ``tl.dot`` on bf16 is not exact), so
the CPU tests never ran them; a GPU or a Triton version the GPU tests never saw could compile them into wrong
numbers. So the first call of each configuration (device, dtype, ``UPO_FWD_IMPL``, ``UPO_LOGITS``, statistics,
bias, softcap) runs a slice of its own inputs through the Triton kernels and through the chunked torch backend,
log-probs, statistics and gradients, and compares them with the tolerances of the GPU tests
(``tests/test_gpu.py``). On a disagreement or an error (a kernel that does not compile) one warning names the
kernel, the GPU and the Triton version, and that configuration runs on the torch backend for the rest of the
process. ``UPO_KERNEL_CHECK=0`` skips the check (docs/kernels.md, "Knobs").
"""
from __future__ import annotations

import contextlib
import os
import sys
import warnings

import torch

from upo_kernels import token_stats
from upo_kernels.backends import (TorchOps, autocast_off, in_input_dtypes, labelled_rows, ops, run_backward,
                                  run_forward)

SLICE_ROWS = 64  # the first rows of the call; every 4th is ignored, so the kernels' gathered-rows path runs
SLICE_VOCAB = 2053  # the weight's first rows (odd: partial vocabulary tiles); labels taken modulo
CHUNKS = {"chunk_tokens": 16, "chunk_vocab": 512}  # several token groups and vocabulary chunks
TOL_OUT, TOL_GRAD = 1e-5, 1e-4  # fp32: relative error of log-probs / gradients (tests/test_gpu.py)
TOL_16BIT = 2e-4  # 16-bit: |triton - truth| <= |naive 16-bit path - truth| + TOL_16BIT |truth| (tests/test_gpu.py)
CHECK_ON_CPU = False  # tests: check under TRITON_INTERPRET=1 too (the check itself is CUDA's)

# configuration -> whether its Triton kernels passed (False: the torch backend serves it)
_verdicts: dict[tuple, bool] = {}


class KernelCheckWarning(UserWarning):
    """A Triton kernel configuration disagreed with the torch backend, or failed to run, on first use."""


def check_enabled(device: torch.device) -> bool:
    """Whether calls on ``device`` are checked: CUDA unless ``UPO_KERNEL_CHECK=0``."""
    value = os.environ.get("UPO_KERNEL_CHECK", "1")
    if value not in ("0", "1"):
        raise ValueError(f"UPO_KERNEL_CHECK must be 0 or 1, got {value!r}")
    return value == "1" and (device.type == "cuda" or CHECK_ON_CPU)


def checked_backend(backend: str, hidden, weight, bias, labels, logit_scale: float, softcap, ignore_index: int,
                    stats: tuple) -> str:
    """``backend``, or ``"torch"`` where this call's Triton configuration failed its first-use check (run
    here on its first call). ``hidden`` ``[N, D]``, ``labels`` ``[N]``: the call's own, not yet gathered."""
    if backend != "triton" or not check_enabled(hidden.device):
        return backend
    kernels = ops("triton")
    options = kernels.call_options()
    key = (str(hidden.device), hidden.dtype, options["fwd_impl"], options["logits"], tuple(stats), bias is not None,
           softcap is not None)
    if key not in _verdicts:
        if _cannot_check_now():
            return backend  # under graph capture or compilation: a later call checks it
        problem = _first_use_problem(kernels, options, hidden, weight, bias, labels, logit_scale, softcap,
                                     ignore_index, stats)
        if problem == "unjudged":
            return backend  # no labelled row, or non-finite inputs: a later call checks it
        _verdicts[key] = problem is None
        if problem is not None:
            warnings.warn(_message(key, problem, hidden.device), KernelCheckWarning, stacklevel=3)
    return backend if _verdicts[key] else "torch"


def _cannot_check_now() -> bool:
    capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
    return capturing or torch.compiler.is_compiling()


def _message(key: tuple, problem: str, device: torch.device) -> str:
    _, dtype, fwd_impl, logits, stats, has_bias, has_softcap = key
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (TRITON_INTERPRET=1)"
    version = getattr(sys.modules.get("triton"), "__version__", "unknown")
    extras = [f"statistics {', '.join(stats)}" if stats else "", "bias" if has_bias else "",
              "softcap" if has_softcap else ""]
    config = ", ".join(part for part in (str(dtype).replace("torch.", ""), f"UPO_FWD_IMPL={fwd_impl}",
                                         f"UPO_LOGITS={logits}", *extras) if part)
    return (f"upo_kernels: {problem}, on first use ({config}) on {gpu} with Triton {version}: this configuration "
            "runs on the torch backend for the rest of the process (UPO_KERNEL_CHECK=0 skips this check)")


def _kernel_name(stage: str, fwd_impl: str) -> str:
    if stage == "backward":
        return "the token-group backward (softmax_grad_epilogue_kernel)"
    if fwd_impl == "cublas":
        return "the cuBLAS forward (logsumexp_tile_kernel)"
    return "the fused forward (linear_logprobs_fwd_kernel)"


@contextlib.contextmanager
def _exact_fp32_matmuls():
    """cuBLAS without TF32 while checking (the GPU tests' fp32 contract), restored after."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def _slice(hidden, weight, bias, labels, ignore_index):
    """The check's inputs from the call's: its first rows (every 4th ignored), the weight's first rows and
    labels modulo their count, a fixed upstream gradient."""
    rows = min(SLICE_ROWS, labels.shape[0])
    vocab = min(SLICE_VOCAB, weight.shape[0])
    h, y = hidden[:rows].detach().clone(), labels[:rows].clone()
    y = torch.where(y == ignore_index, y, y.remainder(vocab))
    y[::4] = ignore_index
    w = weight[:vocab].detach().clone()
    b = None if bias is None else bias[:vocab].detach().clone()
    generator = torch.Generator(device=h.device).manual_seed(0)
    upstream = torch.randn(rows, generator=generator, device=h.device)
    return h, w, b, y, upstream


def _forward(kernels, chunks, h, w, b, y, upstream, logit_scale, softcap, ignore_index, stats):
    """One backend's ``(log-probs of the labelled rows, lse, statistics)``, the rows gathered as the autograd
    Function gathers them."""
    _, h_c, y_c = labelled_rows(h, y, ignore_index)
    return run_forward(kernels, h_c, w, y_c, b, logit_scale, softcap, ignore_index, chunks, stats)


def _backward(kernels, chunks, lse, h, w, b, y, upstream, logit_scale, softcap, ignore_index, stats):
    """One backend's ``(grad_h, grad_w, grad_b)`` of ``sum(upstream * log-probs)`` in the inputs' dtypes."""
    rows, _, y_c = labelled_rows(h, y, ignore_index)
    needs = (True, True, b is not None)
    grads = run_backward(kernels, upstream, rows, h, w, y_c, lse, b, logit_scale, softcap, ignore_index, needs,
                         chunks)
    return in_input_dtypes(grads, h, w, b, needs)


def _run(kernels, chunks, *args):
    """``(log-probs, lse, statistics, gradients)`` of one backend."""
    logp, lse, values = _forward(kernels, chunks, *args)
    return logp, lse, values, _backward(kernels, chunks, lse, *args)


def _first_use_problem(kernels, options, hidden, weight, bias, labels, logit_scale, softcap, ignore_index, stats):
    """None when the Triton kernels agree with the torch backend on a slice of the call; else what went wrong;
    ``"unjudged"`` when the slice cannot tell (no labelled row, non-finite inputs)."""
    h, w, b, y, upstream = _slice(hidden, weight, bias, labels, ignore_index)
    finite = all(t is None or bool(torch.isfinite(t).all()) for t in (h[y != ignore_index], w, b))
    if not (y != ignore_index).any() or not finite:
        return "unjudged"
    args = (h, w, b, y, upstream, logit_scale, softcap, ignore_index, stats)
    chunks = dict(CHUNKS, **options)
    with _exact_fp32_matmuls(), torch.inference_mode(), autocast_off(h.device):
        truth = _run(TorchOps, CHUNKS, *_in_fp32(*args[:4]), *args[4:])
        stage = "forward"
        try:
            logp, lse, values = _forward(kernels, chunks, *args)
            stage = "backward"
            ours = (logp, lse, values, _backward(kernels, chunks, lse, *args))
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as err:  # a kernel that does not compile or launch on this GPU
            return f"{_kernel_name(stage, options['fwd_impl'])} failed: {type(err).__name__}: {_first_line(err)}"
        naive = None if h.dtype == torch.float32 else _naive_16bit(*args)
        mismatch = _mismatch(ours, truth, naive, *args, rounded_logits=options["logits"] == "input")
    if mismatch is None:
        return None
    stage, what = mismatch
    return f"{_kernel_name(stage, options['fwd_impl'])} disagrees with the torch backend ({what})"


def _first_line(err: Exception) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else ""


def _in_fp32(h, w, b, y):
    """fp32 copies of 16-bit inputs: the truth the GPU tests compare 16-bit results with."""
    return h.float(), w.float(), None if b is None else b.float(), y


def _naive_16bit(h, w, b, y, upstream, logit_scale, softcap, ignore_index, stats):
    """The naive 16-bit path of the GPU tests: logits ``h @ w.T + b`` in the inputs' dtype, log_softmax in fp32,
    gradients as autograd computes them (the logit gradient rounded to the inputs' dtype, then multiplied)."""
    keep = y != ignore_index
    z16 = h @ w.t() if b is None else torch.addmm(b, h, w.t())
    z = _capped(z16.float(), logit_scale, softcap)
    log_p = z.log_softmax(-1)
    target = torch.where(keep, y, 0)
    logp = log_p.gather(1, target[:, None])[:, 0][keep]
    dz = -log_p.exp()
    dz[torch.arange(len(y), device=y.device), target] += 1
    dz *= torch.where(keep, upstream, 0)[:, None] * logit_scale
    if softcap is not None:
        dz *= 1 - (z / softcap) ** 2
    dz = dz.to(h.dtype)
    grad_b = None if b is None else dz.float().sum(0).to(b.dtype)
    return logp, (dz @ w, dz.t() @ h, grad_b)


def _mismatch(ours, truth, naive, h, w, b, y, upstream, logit_scale, softcap, ignore_index, stats, rounded_logits):
    """``(stage, what)`` of the first output outside its tolerance, or None."""
    logp, _, values, grads = ours
    true_logp, lse, true_values, true_grads = truth
    keep = y != ignore_index
    named_grads = ("grad_hidden", "grad_weight", "grad_bias")
    if grads[0] is not None and bool((grads[0][~keep] != 0).any()):
        return "backward", "grad_hidden of an ignored row is not 0"
    if naive is None:  # fp32: relative errors, with the GPU tests' floors of the natural magnitudes
        g = float(upstream[keep].double().norm()) * abs(logit_scale)
        floors = (0.1 * g * _rms_row(w), 0.1 * g * _rms_row(h[keep]), 0.1 * g)
        if not (err := _rel_err(logp, true_logp, 0.1 * float(lse.double().norm()))) < TOL_OUT:
            return "forward", f"log-probs: relative error {err:.2e}"
        for name, got, want, floor in zip(named_grads, grads, true_grads, floors):
            if want is not None and not (err := _rel_err(got, want, floor)) < TOL_GRAD:
                return "backward", f"{name}: relative error {err:.2e}"
    else:  # 16-bit: no farther from the fp32 truth than the naive 16-bit path, plus a little
        naive_logp, naive_grads = naive
        for stage, name, got, want, base in (("forward", "log-probs", logp, true_logp, naive_logp),
                                             *(("backward", n, *t) for n, *t in zip(named_grads, grads, true_grads,
                                                                                   naive_grads))):
            if want is None:
                continue
            ours_err, naive_err = _dist(got, want), _dist(base, want)
            allowed = naive_err + TOL_16BIT * float(want.double().norm())
            if not ours_err <= allowed:
                return stage, f"{name}: error {ours_err:.3e} > {allowed:.3e} allowed"
    problem = _stats_problem(values, true_values, h, w, b, y, logit_scale, softcap, ignore_index, rounded_logits)
    return None if problem is None else ("forward", problem)


def _stats_problem(values, true_values, h, w, b, y, logit_scale, softcap, ignore_index, rounded_logits):
    """The GPU tests' rule for statistics: ``|got - truth| <= tol (1 + max|logit|)``; ``is_top1`` exact where
    the label's logit is clear of the best other one."""
    if not values:
        return None
    keep = y != ignore_index
    hf, wf = h[keep].float(), w.float()
    z = _capped(hf @ wf.t() + (0 if b is None else b.float()), logit_scale, softcap)
    tol = 1e-2 if rounded_logits else 1e-5 if h.dtype == torch.float32 else 1e-4
    scale = 1.0 + float(z.abs().max())
    label = z.gather(1, y[keep][:, None])[:, 0]
    others = z.scatter(1, y[keep][:, None], float("-inf")).amax(1)
    clear = (label - others).abs() > tol * scale
    for name in token_stats.STATS:
        if name not in values:
            continue
        got, want = values[name].double(), true_values[name].double()
        if name == "is_top1":
            if bool(((got != want) & clear).any()):
                return "is_top1 differs"
        elif not float((got - want).abs().max()) <= tol * scale:
            return f"{name}: error {float((got - want).abs().max()):.2e} > {tol * scale:.2e}"
    return None


def _capped(z, logit_scale, softcap):
    """``softcap * tanh(logit_scale * z / softcap)`` (or just the scale): the logits the head's options give."""
    z = z * logit_scale
    return z if softcap is None else softcap * torch.tanh(z / softcap)


def _rms_row(t) -> float:
    return float(t.double().pow(2).sum(1).mean().sqrt()) if t.numel() else 0.0


def _dist(a, b) -> float:
    return float((a.double() - b.double()).norm())


def _rel_err(a, b, floor: float) -> float:
    """``||a - b|| / max(||b||, floor)`` in float64, as tests/helpers.py (NaN compares as failing)."""
    denominator = max(float(b.double().norm()), floor)
    err = _dist(a, b)
    return err / denominator if denominator > 0 else err
