"""GPU probe of the fused kernels: correctness vs float64, then speed/memory at the headline size.

Run on a CUDA machine: ``python benchmarks/probe_kernels.py [--quick]``. Prints one line per
measurement and writes JSON to $OUT (or benchmarks/results/). Used to pick the forward (fused
kernel tile configuration, or ``UPO_FWD_IMPL=cublas``) and the backward's token-group budget
(``UPO_GROUP_MB``); ``benchmarks/run_gpu.py`` is the full side-by-side suite.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from benchmarks.measure import env_vars  # noqa: E402
from upo_kernels import linear_logprobs, reference  # noqa: E402


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def inputs(n, d, v, dtype, seed, ignore_frac=0.1, bias=False):
    g = torch.Generator(device="cuda").manual_seed(seed)
    h = torch.randn(n, d, device="cuda", generator=g).to(dtype)
    w = (torch.randn(v, d, device="cuda", generator=g) * (3.0 / d**0.5)).to(dtype)
    y = torch.randint(0, v, (n,), device="cuda", generator=g)
    y[torch.rand(n, device="cuda", generator=g) < ignore_frac] = -100
    b = torch.randn(v, device="cuda", generator=g).to(dtype) if bias else None
    return h, w, y, b


def grads_of(fn, h, w, b, upstream):
    leaves = [t.detach().clone().requires_grad_() for t in (h, w) + ((b,) if b is not None else ())]
    out = fn(*leaves)
    gs = torch.autograd.grad((out.to(upstream.dtype) * upstream).sum(), leaves)
    return out.detach(), gs


def check(n, d, v, dtype, scale=1.0, cap=None, bias=False, seed=0):
    h, w, y, b = inputs(n, d, v, dtype, seed, bias=bias)
    up = torch.randn(n, device="cuda")
    ref_out, ref_g = grads_of(lambda h_, w_, *b_: reference.reference_token_logprobs(
        h_, w_, y, b_[0] if b_ else None, scale, cap), h.double(), w.double(), None if b is None else b.double(), up.double())
    row = {"n": n, "d": d, "v": v, "dtype": str(dtype), "scale": scale, "softcap": cap, "bias": bias}
    for name, backend, impl, logits in (("triton", "triton", "fused", "fp32"),
                                        ("triton_cublas_fwd", "triton", "cublas", "fp32"),
                                        ("triton_input_logits", "triton", "cublas", "input"),
                                        ("torch", "torch", "fused", "fp32")):
        with env_vars(UPO_FWD_IMPL=impl, UPO_LOGITS=logits):
            out, gs = grads_of(lambda h_, w_, *b_: linear_logprobs(h_, w_, y, bias=b_[0] if b_ else None,
                               logit_scale=scale, softcap=cap, backend=backend), h, w, b, up)
        row[name] = [rel(out, ref_out)] + [rel(g, r) for g, r in zip(gs, ref_g)]

    def naive(h_, w_, *b_):
        z = h_ @ w_.t()
        if b_:
            z = z + b_[0]
        z = z.float() * scale
        if cap is not None:
            z = cap * torch.tanh(z / cap)
        lp = torch.log_softmax(z, -1).gather(1, y.clamp(min=0)[:, None])[:, 0]
        return torch.where(y != -100, lp, 0.0)
    out, gs = grads_of(naive, h, w, b, up)
    row["naive"] = [rel(out, ref_out)] + [rel(g, r) for g, r in zip(gs, ref_g)]
    print("CHECK", json.dumps(row), flush=True)
    return row


def bench(fn, warmup=3, rep=7):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(rep):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    return sorted(times)[len(times) // 2]


def peak_extra(fn):
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    kept = torch.cuda.memory_allocated() - base  # returned gradients etc.
    del out
    return peak, kept


# fwd+bwd variants timed at the headline: (forward implementation, grad_hidden group budget in MB,
# logits precision). 256 MB is one group of 16k tokens at D = 4096 (an exact single-product
# grad_weight); "input" rounds the logit tiles to bf16 in both passes (UPO_LOGITS).
VARIANTS = [("fused", 64, "fp32"), ("cublas", 64, "fp32"), ("cublas", 32, "fp32"), ("cublas", 128, "fp32"),
            ("fused", 256, "fp32"), ("cublas", 256, "fp32"), ("cublas", 64, "input"), ("fused", 64, "input")]


def speed(n, d, v, dtype, configs):
    from upo_kernels import triton_ops

    h, w, y, _ = inputs(n, d, v, dtype, 1, ignore_frac=0.0)
    rows = []

    def emit(row):
        rows.append(row)
        print("SPEED", json.dumps(row), flush=True)

    a = torch.randn(n, d, device="cuda", dtype=dtype)
    bt = torch.randn(d, v, device="cuda", dtype=dtype)
    mm = bench(lambda: torch.mm(a, bt))
    emit({"case": "matmul N.D.V", "ms": mm, "limit_4mm_ms": 4 * mm})
    try:
        mm32 = bench(lambda: torch.mm(a, bt, out_dtype=torch.float32))
        emit({"case": "matmul N.D.V fp32 out", "ms": mm32, "ratio_to_1mm": mm32 / mm})
    except (TypeError, RuntimeError) as exc:
        emit({"case": "matmul N.D.V fp32 out", "error": repr(exc)[:300]})
    del a, bt
    coef = torch.randn(n, device="cuda")

    def fwd_bwd():
        hh = h.detach().requires_grad_()
        ww = w.detach().requires_grad_()
        lp = linear_logprobs(hh, ww, y, backend="triton")
        return torch.autograd.grad((lp * coef).sum(), (hh, ww))

    for cfg in configs:
        with env_vars(UPO_TRITON_FWD=",".join(map(str, cfg))):
            try:
                t_f = bench(lambda: linear_logprobs(h, w, y, backend="triton"))
                emit({"case": "triton fwd", "cfg": cfg, "ms": t_f, "ratio_to_1mm": t_f / mm})
            except Exception as exc:  # a config that does not compile on this GPU
                emit({"case": "triton fwd", "cfg": cfg, "error": repr(exc)[:300]})
    for logits in ("fp32", "input"):
        with env_vars(UPO_FWD_IMPL="cublas", UPO_LOGITS=logits):
            t_f = bench(lambda: linear_logprobs(h, w, y, backend="triton"))
            emit({"case": "cublas fwd", "logits": logits, "ms": t_f, "ratio_to_1mm": t_f / mm})
    for impl, group_mb, logits in VARIANTS:
        with env_vars(UPO_FWD_IMPL=impl, UPO_GROUP_MB=group_mb, UPO_LOGITS=logits):
            try:
                t = bench(fwd_bwd, warmup=2, rep=5)
                peak, kept = peak_extra(fwd_bwd)
                emit({"case": "triton fwd+bwd", "fwd": impl, "group_MB": group_mb, "logits": logits,
                      "tiles": triton_ops._tiles(n, d, v), "ms": t, "ratio_to_4mm": t / (4 * mm),
                      "peak_extra_MB": peak / 2**20, "kept_MB": kept / 2**20,
                      "extra_minus_grads_MB": (peak - kept) / 2**20})
            except Exception as exc:  # noqa: BLE001
                emit({"case": "triton fwd+bwd", "fwd": impl, "group_MB": group_mb, "logits": logits,
                      "error": repr(exc)[:300]})
    emit({"case": "cuBLAS paths used", **triton_ops.PATHS})

    def naive():
        hh = h.detach().requires_grad_()
        ww = w.detach().requires_grad_()
        lp = torch.log_softmax((hh @ ww.t()).float(), -1).gather(1, y[:, None])[:, 0]
        return torch.autograd.grad((lp * coef).sum(), (hh, ww))
    try:
        t_n = bench(naive, warmup=1, rep=3)
        peak_n, kept_n = peak_extra(naive)
        emit({"case": "naive fwd+bwd", "ms": t_n, "peak_extra_MB": peak_n / 2**20, "kept_MB": kept_n / 2**20,
              "extra_minus_grads_MB": (peak_n - kept_n) / 2**20})
    except torch.cuda.OutOfMemoryError:
        emit({"case": "naive fwd+bwd", "error": "OOM"})
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    import triton

    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    print("META", json.dumps(meta), flush=True)
    checks = [check(1000, 256, 5003, torch.float32), check(777, 200, 3001, torch.float32, 0.8, 20.0, True),
              check(2048, 1024, 32003, torch.bfloat16), check(1000, 512, 32003, torch.bfloat16, 1.0, 30.0, True)]
    configs = [(256, 128, 64, 8, 3)] if args.quick else [
        (256, 128, 64, 8, 3), (128, 256, 64, 8, 3), (256, 128, 64, 8, 4), (128, 128, 64, 8, 3)]
    speeds = speed(16384, 4096, 128256, torch.bfloat16, configs)
    out_dir = os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "results")
    with open(os.path.join(out_dir, "probe_kernels.json"), "w") as f:
        json.dump({"meta": meta, "checks": checks, "speed": speeds}, f, indent=1)


if __name__ == "__main__":
    main()
