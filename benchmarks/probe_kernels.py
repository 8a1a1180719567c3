"""GPU probe of the fused kernels: correctness vs float64, then speed/memory at the headline size.

Run on a CUDA machine: ``python benchmarks/probe_kernels.py [--quick]``. Prints one line per
measurement and writes JSON to $OUT (or benchmarks/results/). Used to pick the forward tile
configuration; ``benchmarks/run_gpu.py`` is the full side-by-side suite.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

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
    for backend in ("triton", "torch"):
        out, gs = grads_of(lambda h_, w_, *b_: linear_logprobs(h_, w_, y, bias=b_[0] if b_ else None,
                           logit_scale=scale, softcap=cap, backend=backend), h, w, b, up)
        row[backend] = [rel(out, ref_out)] + [rel(g, r) for g, r in zip(gs, ref_g)]

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


def speed(n, d, v, dtype, configs):
    h, w, y, _ = inputs(n, d, v, dtype, 1, ignore_frac=0.0)
    rows = []
    a = torch.randn(n, d, device="cuda", dtype=dtype)
    bt = torch.randn(d, v, device="cuda", dtype=dtype)
    mm = bench(lambda: torch.mm(a, bt))
    del a, bt
    rows.append({"case": "matmul N.D.V", "ms": mm, "limit_4mm_ms": 4 * mm})
    print("SPEED", json.dumps(rows[-1]), flush=True)
    coef = torch.randn(n, device="cuda")

    def fwd_bwd(backend):
        hh = h.detach().requires_grad_()
        ww = w.detach().requires_grad_()
        lp = linear_logprobs(hh, ww, y, backend=backend)
        gh, gw = torch.autograd.grad((lp * coef).sum(), (hh, ww))
        return gh, gw

    for cfg in configs:
        os.environ["UPO_TRITON_FWD"] = ",".join(map(str, cfg))
        try:
            t_f = bench(lambda: linear_logprobs(h, w, y, backend="triton"))
            rows.append({"case": "triton fwd", "cfg": cfg, "ms": t_f, "ratio_to_1mm": t_f / mm})
        except Exception as exc:  # a config that does not compile on this GPU
            rows.append({"case": "triton fwd", "cfg": cfg, "error": repr(exc)[:300]})
        print("SPEED", json.dumps(rows[-1]), flush=True)
    best = min((r for r in rows if r.get("case") == "triton fwd" and "ms" in r), key=lambda r: r["ms"], default=None)
    if best:
        os.environ["UPO_TRITON_FWD"] = ",".join(map(str, best["cfg"]))
    t = bench(lambda: fwd_bwd("triton"), warmup=2, rep=5)
    peak, kept = peak_extra(lambda: fwd_bwd("triton"))
    rows.append({"case": "triton fwd+bwd", "cfg": best and best["cfg"], "ms": t, "ratio_to_4mm": t / (4 * mm),
                 "peak_extra_MB": peak / 2**20, "kept_MB": kept / 2**20})
    print("SPEED", json.dumps(rows[-1]), flush=True)

    def naive():
        hh = h.detach().requires_grad_()
        ww = w.detach().requires_grad_()
        lp = torch.log_softmax((hh @ ww.t()).float(), -1).gather(1, y[:, None])[:, 0]
        return torch.autograd.grad((lp * coef).sum(), (hh, ww))
    try:
        t_n = bench(naive, warmup=1, rep=3)
        peak_n, kept_n = peak_extra(naive)
        rows.append({"case": "naive fwd+bwd", "ms": t_n, "peak_extra_MB": peak_n / 2**20, "kept_MB": kept_n / 2**20})
    except torch.cuda.OutOfMemoryError:
        rows.append({"case": "naive fwd+bwd", "error": "OOM"})
    print("SPEED", json.dumps(rows[-1]), flush=True)
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
    configs = [(128, 128, 64, 8, 3)] if args.quick else [
        (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 128, 64, 4, 4), (64, 256, 64, 8, 3), (256, 128, 64, 8, 3)]
    speeds = speed(16384, 4096, 128256, torch.bfloat16, configs)
    out_dir = os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "results")
    with open(os.path.join(out_dir, "probe_kernels.json"), "w") as f:
        json.dump({"meta": meta, "checks": checks, "speed": speeds}, f, indent=1)


if __name__ == "__main__":
    main()
