"""Shared test utilities: random input builders, error metrics, reference gradients, micro-model set-up.

Seeds: every builder takes a ``seed``. ``new_seed()`` draws a fresh one per call (so each
run explores new inputs) unless ``UPO_TEST_SEED`` is set, in which case that value is used
(re-run a failure with ``UPO_TEST_SEED=<seed printed in the failure message>``).
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass

import pytest
import torch

from upo_kernels import TOKEN_STATS, reference
from upo_kernels.buffers import poison_outputs

# Numerical contract (docs/kernels.md), fp32 inputs vs the float64 oracle.
TOL_OUT = 1e-5
TOL_GRAD = 1e-4


def new_seed() -> int:
    env = os.environ.get("UPO_TEST_SEED")
    if env is not None:
        return int(env)
    return random.SystemRandom().randrange(2**31)


def rel_err(a: torch.Tensor, b: torch.Tensor, floor: float = 0.0) -> float:
    """``||a - b|| / max(||b||, floor)`` in float64 (absolute error when both are zero).

    ``floor`` is the natural magnitude of the quantity (see ``fp32_floors``): it only matters when
    ``b`` is tiny through cancellation (e.g. a log-prob of -1e-4 computed as ``z_y - lse`` with
    ``lse`` ~ 10), where no fp32 implementation can be relatively accurate.
    """
    a = a.detach().double().cpu()
    b = b.detach().double().cpu()
    assert a.shape == b.shape, f"shape mismatch {tuple(a.shape)} vs {tuple(b.shape)}"
    num = torch.linalg.vector_norm(a - b).item()
    den = max(torch.linalg.vector_norm(b).item(), floor)
    return num / den if den > 0 else num


def assert_close_rel(a, b, tol, what, seed=None, floor=0.0):
    assert a is not None, f"{what}: got None (seed={seed})"
    assert torch.isfinite(a).all(), f"{what}: non-finite values (NaN = unwritten under poison_outputs) (seed={seed})"
    err = rel_err(a, b, floor)
    assert err < tol, f"{what}: rel err {err:.3e} >= {tol:.0e} (seed={seed})"


def fp32_floors(hidden, weight, labels, upstream, lse, logit_scale=1.0, ignore_index=-100, factor=0.1):
    """Natural magnitudes of log-probs and grads, times ``factor`` (denominator floors for rel_err).

    log-probs: ||lse|| over kept tokens; grad_hidden: ||g|| * rms row norm of W * scale;
    grad_weight: ||g|| * rms norm of kept hidden rows * scale; grad_bias: ||g|| * scale.
    With tol 1e-5 / 1e-4 this allows ~1e-6 / 1e-5 of the natural magnitude (a few fp32 ulps).
    """
    keep = (labels != ignore_index).reshape(-1).cpu()
    h = hidden.detach().double().cpu().reshape(-1, hidden.shape[-1])[keep]
    g = upstream.detach().double().cpu().reshape(-1)[keep]
    gn = g.norm().item() * abs(logit_scale)
    w_rms = weight.detach().double().cpu().pow(2).sum(1).mean().sqrt().item()
    h_rms = h.pow(2).sum(1).mean().sqrt().item() if h.numel() else 0.0
    lse_n = lse.detach().double().cpu().reshape(-1)[keep].norm().item()
    return {"out": factor * lse_n, "gh": factor * gn * w_rms, "gw": factor * gn * h_rms, "gb": factor * gn}


def gen(seed: int, device="cpu") -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    return g


@dataclass
class Inputs:
    hidden: torch.Tensor
    weight: torch.Tensor
    labels: torch.Tensor
    bias: torch.Tensor | None
    seed: int


def random_labels(shape, v, ignore_frac, g, ignore_index=-100):
    labels = torch.randint(0, v, shape, generator=g)
    if ignore_frac > 0:
        drop = torch.rand(shape, generator=g) < ignore_frac
        labels[drop] = ignore_index
    return labels


def make_inputs(n, d, v, *, dtype=torch.float32, device="cpu", ignore_frac=0.2, seed=None,
                lead_shape=None, bias=False, weight_scale=3.0, hidden_scale=1.0, ignore_index=-100) -> Inputs:
    """Random ``hidden [*lead_shape or n, d]``, ``weight [v, d]``, ``labels``, optional ``bias [v]``.

    hidden ~ N(0, hidden_scale^2), weight ~ N(0, 1/d) * weight_scale, so the logits have a standard
    deviation of about ``weight_scale`` (a realistic spread: a few nats).
    """
    seed = new_seed() if seed is None else seed
    g = gen(seed)
    shape = tuple(lead_shape) if lead_shape is not None else (n,)
    hidden = torch.randn(*shape, d, generator=g) * hidden_scale
    weight = torch.randn(v, d, generator=g) * (weight_scale / d**0.5)
    b = torch.randn(v, generator=g) if bias else None
    labels = random_labels(shape, v, ignore_frac, g, ignore_index)
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    return Inputs(cast(hidden), cast(weight), labels.to(device), cast(b), seed)


def leaf(t, dtype=None):
    if t is None:
        return None
    t = t.detach().clone()
    if dtype is not None:
        t = t.to(dtype)
    return t.requires_grad_(True)


def grads_of(out, upstream, tensors):
    """Backward ``out`` with ``upstream``; return ``[t.grad for t in tensors]`` (None entries kept)."""
    out.backward(upstream)
    return [None if t is None else t.grad for t in tensors]


def reference_token_outputs(inp: Inputs, upstream, *, logit_scale=1.0, softcap=None, ignore_index=-100):
    """Float64 per-token log-probs and grads (hidden, weight, bias) for an upstream gradient."""
    h, w, b = leaf(inp.hidden, torch.float64), leaf(inp.weight, torch.float64), leaf(inp.bias, torch.float64)
    out = reference.reference_token_logprobs(h, w, inp.labels, b, logit_scale=logit_scale, softcap=softcap,
                                             ignore_index=ignore_index)
    gh, gw, gb = grads_of(out, upstream.double(), [h, w, b])
    return out.detach(), gh, gw, gb


def reference_floors(inp: Inputs, upstream, *, logit_scale=1.0, softcap=None, ignore_index=-100):
    lse = torch.logsumexp(reference.reference_logits(inp.hidden, inp.weight, inp.bias, logit_scale, softcap), -1)
    return fp32_floors(inp.hidden, inp.weight, inp.labels, upstream, lse, logit_scale, ignore_index)


def run_token_fn(fn, inp: Inputs, upstream, **kwargs):
    """Call ``fn(hidden, weight, labels, bias=..., **kwargs)`` under poison_outputs and backprop."""
    h, w, b = leaf(inp.hidden), leaf(inp.weight), leaf(inp.bias)
    with poison_outputs():
        out = fn(h, w, inp.labels, bias=b, **kwargs)
        gh, gw, gb = grads_of(out, upstream.to(out.dtype), [h, w, b])
    return out.detach(), gh, gw, gb


# ----------------------------------------------------------------------------- token statistics
def stats_inputs(n, d, v, seed, *, top1_frac=0.4, logit_kw=None, **kw):
    """Random inputs where a share of the labels is the (float64) argmax, so is_top1 takes both values."""
    inp = make_inputs(n, d, v, seed=seed, **kw)
    z = reference.reference_logits(inp.hidden, inp.weight, inp.bias, **(logit_kw or {}))
    g = gen(seed + 3)
    pick = (torch.rand(inp.labels.shape, generator=g) < top1_frac).to(inp.labels.device)
    pick &= inp.labels != kw.get("ignore_index", -100)
    inp.labels[pick] = z.argmax(-1)[pick]
    return inp


def has_both_top1_kinds(ref_top1, labels, ignore_index=-100):
    """Whether the labelled tokens include top-1 labels and others (a precondition of the tests)."""
    kept = int((labels != ignore_index).sum())
    return 0 < float(ref_top1.sum()) < kept


def check_stats(got, ref_stats, logits, labels, stats, what, seed, tol=1e-5, ignore_index=-100):
    """Each statistic: |got - ref| <= tol * (1 + max|logit|) (the fp32 rounding of terms of that size);
    is_top1 exact except where the label's logit is within that of the best other one."""
    assert isinstance(got, dict) and tuple(got) == tuple(s for s in TOKEN_STATS if s in stats), f"{what}: {tuple(got)}"
    scale = 1.0 + logits[torch.isfinite(logits)].abs().max().item()
    ignored = labels == ignore_index
    z = logits.double()
    safe = torch.where(ignored, 0, labels)
    label_logit = z.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    others = z.scatter(-1, safe.unsqueeze(-1), float("-inf")).amax(-1)
    clear = (label_logit - others).abs() > tol * scale
    for name, value in got.items():
        assert value.dtype == torch.float32 and value.shape == labels.shape, f"{what} {name}: {value.dtype}"
        assert not value.requires_grad, f"{what} {name}: statistics carry no gradient"
        assert (value[ignored] == 0).all(), f"{what} {name}: ignored rows must be 0 (seed={seed})"
        ref = ref_stats[name]
        if name == "is_top1":
            bad = (value.double() != ref) & clear
            assert not bad.any(), f"{what} is_top1: {int(bad.sum())} wrong rows (seed={seed})"
            continue
        assert torch.isfinite(value).all(), f"{what} {name}: non-finite (unwritten?) values (seed={seed})"
        err = (value.double() - ref).abs().max().item()
        assert err <= tol * scale, f"{what} {name}: max abs err {err:.2e} > {tol * scale:.2e} (seed={seed})"


# ----------------------------------------------------------------------------- low precision
def naive_bf16(hidden, weight, labels, upstream, ignore_index=-100):
    """The naive low-precision path: bf16 logits, fp32 log_softmax, gather; grads by autograd."""
    h, w = leaf(hidden), leaf(weight)
    keep = labels != ignore_index
    logits = h @ w.t()
    lp = logits.float().log_softmax(-1).gather(-1, torch.where(keep, labels, 0)[..., None])[..., 0]
    lp = torch.where(keep, lp, torch.zeros_like(lp))
    lp.backward(upstream)
    return lp.detach(), h.grad, w.grad


def check_no_worse_than_naive(fn, inp, backend, tol_rel=2e-4):
    """|ours - ref| <= |naive - ref| + tol_rel * |ref| (norms) for log-probs, grad_hidden, grad_weight.

    The Cut Cross-Entropy discipline for low-precision inputs; ``fn`` is ``linear_logprobs``.
    """
    seed = inp.seed
    up = torch.randn(inp.labels.shape, generator=gen(seed + 1)).to(inp.hidden.device)
    ref_out, ref_gh, ref_gw, _ = reference_token_outputs(inp, up)
    out, gh, gw, _ = run_token_fn(fn, inp, up, backend=backend)
    assert out.dtype == torch.float32 and gh.dtype == inp.hidden.dtype and gw.dtype == inp.weight.dtype
    nv_out, nv_gh, nv_gw = naive_bf16(inp.hidden, inp.weight, inp.labels, up)
    report = []
    for name, ours, nv, ref in [("log-probs", out, nv_out, ref_out), ("grad_hidden", gh, nv_gh, ref_gh),
                                ("grad_weight", gw, nv_gw, ref_gw)]:
        assert torch.isfinite(ours).all(), f"{name}: non-finite (seed={seed})"
        e_ours = (ours.double() - ref).norm().item()
        e_naive = (nv.double() - ref).norm().item()
        tol = tol_rel * ref.norm().item()
        report.append(f"{name}: ours {e_ours:.3e} naive {e_naive:.3e} tol {tol:.1e}")
        assert e_ours <= e_naive + tol, f"{name}: ours {e_ours:.3e} > naive {e_naive:.3e} + {tol:.1e} (seed={seed})"
    print("; ".join(report))


# ----------------------------------------------------------------------------- preference batches
@dataclass
class PrefBatch:
    hidden: torch.Tensor       # [2B, T, D]
    labels: torch.Tensor       # [2B, T]
    weight: torch.Tensor       # [V, D]
    bias: torch.Tensor | None  # [V]
    ref_hidden: torch.Tensor   # [2B, T, D]
    lengths: list              # number of used positions (prompt + response) per row
    seed: int


def make_pref_batch(b, t, d, v, *, bias=False, seed=None, dtype=torch.float32, device="cpu",
                    min_prompt=1, ignore_index=-100, weight_scale=3.0, ref_noise=0.3) -> PrefBatch:
    """Padded preference batch: rows 0..B-1 chosen, B..2B-1 rejected.

    Each row: a prompt prefix (labels = ignore_index), >= 1 response token, then right padding
    (labels = ignore_index). A few response tokens are also masked in the middle. ``ref_hidden`` is
    ``hidden`` plus noise (a "reference model" close to the policy).
    """
    seed = new_seed() if seed is None else seed
    g = gen(seed)
    rows = 2 * b
    hidden = torch.randn(rows, t, d, generator=g)
    weight = torch.randn(v, d, generator=g) * (weight_scale / d**0.5)
    bias_t = torch.randn(v, generator=g) if bias else None
    labels = torch.full((rows, t), ignore_index, dtype=torch.long)
    lengths = []
    for r in range(rows):
        used = int(torch.randint(min_prompt + 1, t + 1, (1,), generator=g))  # prompt + response <= T
        prompt = int(torch.randint(min_prompt, used, (1,), generator=g))     # >= 1 response token
        labels[r, prompt:used] = torch.randint(0, v, (used - prompt,), generator=g)
        if used - prompt > 2:  # mask one interior response token as well
            k = int(torch.randint(prompt + 1, used, (1,), generator=g))
            labels[r, k] = ignore_index
        lengths.append(used)
    ref_hidden = hidden + ref_noise * torch.randn(rows, t, d, generator=g)
    cast = lambda x: None if x is None else x.to(device=device, dtype=dtype)  # noqa: E731
    return PrefBatch(cast(hidden), labels.to(device), cast(weight), cast(bias_t), cast(ref_hidden), lengths, seed)


def pack(hidden, labels, lengths):
    """Padded ``[R, T, ...]`` -> packed ``[N, ...]`` keeping the first ``lengths[r]`` positions of each row."""
    hs = torch.cat([hidden[r, :n] for r, n in enumerate(lengths)])
    ls = torch.cat([labels[r, :n] for r, n in enumerate(lengths)])
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lengths), 0)
    return hs, ls, cu.to(hidden.device)


def unpack_grad(grad_packed, lengths, t):
    """Inverse of ``pack`` for a gradient: ``[N, D]`` -> ``[R, T, D]`` with zeros in the padding."""
    d = grad_packed.shape[-1]
    out = grad_packed.new_zeros(len(lengths), t, d)
    off = 0
    for r, n in enumerate(lengths):
        out[r, :n] = grad_packed[off:off + n]
        off += n
    return out


# --------------------------------------------------------------------------- micro-model training tests
# A micro Llama (hidden 32, 2 layers) for the end-to-end trainer and CLI tests.
MICRO_MODEL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
               "num_key_value_heads": 2}


@pytest.fixture
def one_thread():
    """Tiny matmuls: one thread per test process is fastest, and fair to a parallel worker.

    Use it in a module with ``pytestmark = pytest.mark.usefixtures("one_thread")`` after
    importing it from here.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def check_split_passes(ops, inp: Inputs, seed, *, scale=1.0, cap=None, chunk_tokens=None, chunk_vocab=None):
    """A backend's raw ``ops.forward``/``ops.backward`` (chunked or triton_ops) against float64:
    lse, log-probs and every gradient, under poison_outputs, with the given tile sizes."""
    from upo_kernels import reference

    up = torch.randn(inp.labels.shape, generator=gen(seed + 1))
    ref_out, ref_gh, ref_gw, ref_gb = reference_token_outputs(inp, up, logit_scale=scale, softcap=cap)
    fl = reference_floors(inp, up, logit_scale=scale, softcap=cap)
    chunks = dict(chunk_tokens=chunk_tokens, chunk_vocab=chunk_vocab)
    with poison_outputs():
        logp, lse = ops.forward(inp.hidden, inp.weight, inp.labels, inp.bias, scale, cap, -100, **chunks)
        gh, gw, gb = ops.backward(up, inp.hidden, inp.weight, inp.labels, lse, inp.bias, scale, cap, -100, **chunks)
    ref_lse = torch.logsumexp(reference.reference_logits(inp.hidden, inp.weight, inp.bias, scale, cap), -1)
    assert_close_rel(lse, ref_lse, TOL_OUT, "lse", seed)
    assert_close_rel(logp, ref_out, TOL_OUT, "log-probs", seed, fl["out"])
    assert_close_rel(gh, ref_gh, TOL_GRAD, "grad_hidden", seed, fl["gh"])
    assert_close_rel(gw, ref_gw, TOL_GRAD, "grad_weight", seed, fl["gw"])
    if inp.bias is not None:
        assert_close_rel(gb, ref_gb, TOL_GRAD, "grad_bias", seed, fl["gb"])
