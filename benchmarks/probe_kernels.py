"""Probe of the Triton backend's variants at the headline: time, extra memory and bf16 accuracy.

    python benchmarks/probe_kernels.py                 # headline grid on CUDA (~40 s on an H200)
    python benchmarks/probe_kernels.py --dry-run       # the same code on CPU: tiny fp32 shapes, Triton
                                                       # under TRITON_INTERPRET=1
    python benchmarks/probe_kernels.py --checks --fwd-configs   # + small float64 checks, forward tiles

The variants are the knobs the kernels read from the environment: forward implementation
(``UPO_FWD_IMPL`` fused | cublas) x logit-tile precision (``UPO_LOGITS`` fp32 | input) x token
group budget (``UPO_GROUP_MB``), each run as ``linear_logprobs`` forward + backward (grads of
``sum(coef * logp)``, random ``coef``) on the same inputs as the naive bf16 path. For each
variant:

* accuracy: ``||ours - truth||`` for the log-probs, ``grad_hidden`` and ``grad_weight``, where
  truth is the same function in float64 on the exactly upcast inputs (in blocks of 4096 tokens:
  a few GB at the headline); a variant is *accurate* when for all three
  ``||ours - truth|| <= ||naive_bf16 - truth|| + 2e-4 ||truth||`` (the rule of tests/test_gpu.py);
* time: median of ``--reps`` fwd+bwd calls after ``--warmup`` (CUDA events);
* extra memory: peak allocated during one call minus what was allocated before it minus the
  returned outputs (grads, log-probs).

Every row is printed (``VARIANT {json}``) and the JSON (``probe_kernels.json`` in ``--out``,
``$OUT`` or ``./bench-results``) rewritten as soon as it is measured; no new row starts after
``--budget`` seconds. ``benchmarks/pick_default.py`` reads the JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

if "--dry-run" in sys.argv:  # before anything imports triton.jit modules
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from benchmarks import common  # noqa: E402
from benchmarks.measure import PeakMemory, Timer, env_vars  # noqa: E402
from upo_kernels import linear_logprobs  # noqa: E402

KNOBS = ("UPO_FWD_IMPL", "UPO_LOGITS", "UPO_GROUP_MB", "UPO_TILE_MB", "UPO_TRITON_FWD")
TOL_REL = 2e-4  # as tests/helpers.check_no_worse_than_naive

# name: (N, D, V, dtype, device, group budgets in MB (None: the library default x 1, 2, 1/2, 4; the
# first stands for the default), base environment)
SHAPES = {
    "headline": (16384, 4096, 128256, torch.bfloat16, "cuda", None, {}),
    # 1 group, or 2 groups of 128 tokens; 2 vocabulary chunks (128 + 32 columns)
    "dry-run": (256, 16, 160, torch.float32, "cpu", (0.015625, 0.0078125), {"UPO_TILE_MB": "0.0625"}),
}


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny fp32 shapes, Triton interpreter")
    ap.add_argument("--out", default=None, help="output folder (default $OUT, else ./bench-results)")
    ap.add_argument("--name", default="probe_kernels.json")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds after which no new measurement starts (default: none)")
    ap.add_argument("--impls", default="fused,cublas", help="UPO_FWD_IMPL values")
    ap.add_argument("--logits", default="fp32,input", help="UPO_LOGITS values")
    ap.add_argument("--group-mb", default=None, help="UPO_GROUP_MB values (default: per shape)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed calls per variant (GPU 2, dry run 0)")
    ap.add_argument("--reps", type=int, default=None, help="timed calls per variant (GPU 5, dry run 1)")
    ap.add_argument("--checks", action="store_true", help="also the small float64 correctness checks")
    ap.add_argument("--fwd-configs", action="store_true", help="also time fused-forward tile configs")
    ap.add_argument("--no-naive", action="store_true", help="skip timing the naive path (accuracy still uses it)")
    return ap.parse_args(argv)


def _csv(text, cast=str):
    return [cast(x) for x in str(text).split(",") if x.strip()]


def variants(impls, logits, groups):
    """Every (impl, logits, group) combination; the default group budget first, so that a cut
    keeps the forward x logits comparison at the default."""
    out = []
    for g in groups:
        for impl in impls:
            for lg in logits:
                out.append({"UPO_FWD_IMPL": impl, "UPO_LOGITS": lg, "UPO_GROUP_MB": _mb(g)})
    return out


def _mb(x):
    x = float(x)
    return str(int(x)) if x == int(x) else repr(x)


def variant_name(env):
    return f"{env['UPO_FWD_IMPL']}/{env['UPO_LOGITS']}/G{env['UPO_GROUP_MB']}"


# ----------------------------------------------------------------------------- inputs and references
def make(n, d, v, dtype, device, seed=1):
    g = torch.Generator(device=device).manual_seed(seed)
    h = torch.randn(n, d, device=device, generator=g).to(dtype)
    w = (torch.randn(v, d, device=device, generator=g) * (3.0 / d**0.5)).to(dtype)
    y = torch.randint(0, v, (n,), device=device, generator=g)
    coef = torch.randn(n, device=device, generator=g)
    return h, w, y, coef


@torch.no_grad()
def truth(h, w, y, coef, rows=4096):
    """log-probs, grad_hidden, grad_weight of ``sum(coef * logp)`` in float64 on the exactly
    upcast inputs, ``rows`` tokens at a time."""
    dt = torch.float64
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        W = w.to(dt)
        n = h.shape[0]
        logp = torch.empty(n, dtype=dt, device=h.device)
        gh = torch.empty(h.shape, dtype=dt, device=h.device)
        gw = torch.zeros(W.shape, dtype=dt, device=h.device)
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            hc, yc, cc = h[r0:r1].to(dt), y[r0:r1], coef[r0:r1].to(dt)
            z = hc @ W.t()
            lse = torch.logsumexp(z, 1)
            logp[r0:r1] = z.gather(1, yc[:, None])[:, 0] - lse
            z.sub_(lse[:, None]).exp_().mul_(-cc[:, None])  # dz = coef * (onehot - softmax)
            z.scatter_add_(1, yc[:, None], cc[:, None])
            gh[r0:r1] = z @ W
            gw.addmm_(z.t(), hc)
            del z
        return logp, gh, gw
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


def naive(h, w, y, coef):
    """The naive path at the inputs' dtype: logits, ``.float().log_softmax``, gather, autograd."""
    hh = h.detach().requires_grad_()
    ww = w.detach().requires_grad_()
    lp = torch.log_softmax((hh @ ww.t()).float(), -1).gather(1, y[:, None])[:, 0]
    gh, gw = torch.autograd.grad((lp * coef).sum(), (hh, ww))
    return lp.detach(), gh, gw


def ours(h, w, y, coef):
    hh = h.detach().requires_grad_()
    ww = w.detach().requires_grad_()
    lp = linear_logprobs(hh, ww, y, backend="triton")
    gh, gw = torch.autograd.grad((lp * coef).sum(), (hh, ww))
    return lp.detach(), gh, gw


def err_norm(a, ref, rows=8192):
    """||a - ref|| with the difference formed in ref's dtype, a block of rows at a time."""
    a2, r2 = a.reshape(a.shape[0], -1), ref.reshape(ref.shape[0], -1)
    total = 0.0
    for i in range(0, a2.shape[0], rows):
        total += float(((a2[i:i + rows].to(r2.dtype) - r2[i:i + rows]) ** 2).sum())
    return total ** 0.5


def norm(t, rows=8192):
    t2 = t.reshape(t.shape[0], -1)
    return sum(float((t2[i:i + rows] ** 2).sum()) for i in range(0, t2.shape[0], rows)) ** 0.5


QUANTITIES = ("logp", "grad_hidden", "grad_weight")


def errors(outs, ref):
    return {q: err_norm(o, r) for q, o, r in zip(QUANTITIES, outs, ref)}


def verdict(err_ours, err_naive, ref_norms, tol_rel=TOL_REL):
    """Per quantity: ours, naive, tol and whether ours <= naive + tol; plus the overall verdict."""
    out, ok_all = {}, True
    for q in QUANTITIES:
        tol = tol_rel * ref_norms[q]
        ok = bool(err_ours[q] <= err_naive[q] + tol)  # NaN fails
        ok_all &= ok
        out[q] = {"ours": err_ours[q], "naive": err_naive[q], "tol": tol, "ok": ok}
    return out, ok_all


# ----------------------------------------------------------------------------- timing
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_calls(fn, device, warmup, reps):
    for _ in range(warmup):
        fn()
    sync(device)
    timer = Timer(device)
    return [timer(fn)[0] * 1e3 for _ in range(reps)]


def out_bytes(outs):
    return sum(t.numel() * t.element_size() for t in outs)


def measured_call(fn, device):
    """One call under PeakMemory: (outputs, extra bytes = peak - base - returned outputs, method)."""
    with PeakMemory(device) as mem:
        outs = fn()
    return outs, max(0, mem.peak - mem.base - out_bytes(outs)), mem.method


# ----------------------------------------------------------------------------- checks (small shapes)
def small_checks(device, emit):
    """fp32 and bf16 linear_logprobs (both forwards, both logit modes) vs float64 at small shapes:
    relative errors, as the GPU tests check them; here for the record."""
    cases = [(1000, 256, 5003, torch.float32), (2048, 1024, 32003, torch.bfloat16)]
    if device.type == "cpu":
        cases = [(64, 16, 97, torch.float32)]
    for n, d, v, dtype in cases:
        h, w, y, coef = make(n, d, v, dtype, device, seed=7)
        ref = truth(h.double(), w.double(), y, coef.double())  # float64
        ref_n = {q: norm(r) for q, r in zip(QUANTITIES, ref)}
        row = {"n": n, "d": d, "v": v, "dtype": str(dtype).replace("torch.", "")}
        for name, fn in [("naive", naive)] + [
                (f"{i}/{lg}", ours) for i in ("fused", "cublas") for lg in ("fp32", "input")]:
            knobs = {} if name == "naive" else {"UPO_FWD_IMPL": name.split("/")[0], "UPO_LOGITS": name.split("/")[1]}
            with env_vars(**knobs):
                e = errors(fn(h, w, y, coef), ref)
            row[name] = {q: e[q] / max(ref_n[q], 1e-300) for q in QUANTITIES}
        emit("checks", row)


# ----------------------------------------------------------------------------- main
def main(argv=None):
    args = parse(argv)
    started = time.time()
    key = "dry-run" if args.dry_run else "headline"
    n, d, v, dtype, dev, groups, base_env = SHAPES[key]
    device = torch.device(dev)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("# no CUDA device: nothing measured (use --dry-run to exercise the code on CPU)", flush=True)
        return 1
    from upo_kernels import triton_ops

    with _unset(KNOBS):  # the library's own defaults (as documented, if the helpers moved)
        lib_default = {"UPO_FWD_IMPL": getattr(triton_ops, "forward_impl", lambda: "fused")(),
                       "UPO_LOGITS": getattr(triton_ops, "logits_mode", lambda: "fp32")()}
    if groups is None:
        g0 = getattr(triton_ops, "DEFAULT_GROUP_MB", 64)
        groups = (g0, 2 * g0, g0 / 2, 4 * g0)
    lib_default["UPO_GROUP_MB"] = _mb(groups[0])
    groups = _csv(args.group_mb, float) if args.group_mb else groups
    warmup = args.warmup if args.warmup is not None else (0 if args.dry_run else 2)
    reps = args.reps if args.reps is not None else (1 if args.dry_run else 5)
    out_path = os.path.join(common.out_dir(args.out), args.name)

    import triton

    meta = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "torch": torch.__version__,
            "triton": triton.__version__, "dry_run": args.dry_run,
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "CPU (Triton interpreter)",
            "git_commit": _git_commit()}
    doc = {"meta": meta, "shape": {"name": key, "N": n, "D": d, "V": v, "dtype": str(dtype).replace("torch.", "")},
           "rule": {"tol_rel": TOL_REL, "text": "||ours - truth|| <= ||naive - truth|| + tol_rel * ||truth|| for "
                    "log-probs, grad_hidden and grad_weight; truth = float64 on the exactly upcast inputs"},
           "default_env": lib_default, "base_env": base_env, "timing": {"warmup": warmup, "reps": reps},
           "matmul": {}, "forward": [], "variants": [], "naive": {}, "checks": [], "complete": False}
    print("META", json.dumps(meta), flush=True)

    def emit(section, row):
        row = dict(row, t_s=round(time.time() - started, 1))
        if isinstance(doc[section], list):
            doc[section].append(row)
        else:
            doc[section] = row
        print(section.upper(), json.dumps(row, default=str), flush=True)
        common.write_json(doc, out_path)

    def over_budget():
        return args.budget is not None and time.time() - started > args.budget

    # Start from the library defaults whatever the caller's environment says; base_env on top.
    with _unset(KNOBS), env_vars(**base_env):
        if args.checks:
            small_checks(device, emit)
        h, w, y, coef = make(n, d, v, dtype, device)
        emit("matmul", _matmul(h, w, device))

        ref = truth(h, w, y, coef)
        ref_norms = {q: norm(r) for q, r in zip(QUANTITIES, ref)}
        outs, extra, method = measured_call(lambda: naive(h, w, y, coef), device)
        err_naive = errors(outs, ref)
        del outs
        naive_row = {"errors": err_naive, "ref_norms": ref_norms, "extra_bytes": extra, "mem_method": method}
        if not args.no_naive:
            ms = time_calls(lambda: naive(h, w, y, coef), device, min(warmup, 1), max(1, min(reps, 3)))
            naive_row.update(ms=statistics.median(ms), samples_ms=ms)
        emit("naive", naive_row)
        _free(device)

        for impl, lg in [(i, lg) for lg in _csv(args.logits) for i in _csv(args.impls)]:
            if over_budget():
                break
            with env_vars(UPO_FWD_IMPL=impl, UPO_LOGITS=lg):
                try:
                    fwd = lambda: linear_logprobs(h, w, y, backend="triton")  # noqa: E731
                    ms = time_calls(fwd, device, warmup, reps)
                    emit("forward", {"UPO_FWD_IMPL": impl, "UPO_LOGITS": lg, "ms": statistics.median(ms),
                                     "samples_ms": ms})
                except Exception as exc:  # noqa: BLE001 - a variant that fails is a finding
                    emit("forward", {"UPO_FWD_IMPL": impl, "UPO_LOGITS": lg, "error": repr(exc)[:400]})
        if args.fwd_configs and not args.dry_run:
            for cfg in ((256, 128, 64, 8, 3), (128, 256, 64, 8, 3), (256, 128, 64, 8, 4), (128, 128, 64, 8, 3)):
                with env_vars(UPO_TRITON_FWD=",".join(map(str, cfg))):
                    try:
                        ms = time_calls(lambda: linear_logprobs(h, w, y, backend="triton"), device, 2, 5)
                        emit("forward", {"UPO_TRITON_FWD": list(cfg), "ms": statistics.median(ms), "samples_ms": ms})
                    except Exception as exc:  # noqa: BLE001
                        emit("forward", {"UPO_TRITON_FWD": list(cfg), "error": repr(exc)[:400]})

        for env in variants(_csv(args.impls), _csv(args.logits), groups):
            row = {"name": variant_name(env), "env": env}
            if over_budget():
                emit("variants", dict(row, status="budget", error=f"not started within {args.budget:.0f} s"))
                continue
            try:
                with env_vars(**env):  # covers the backward too (UPO_GROUP_MB is read there)
                    row["tiles"] = _tiles(triton_ops, n, d, v)
                    outs, extra, method = measured_call(lambda: ours(h, w, y, coef), device)
                    err = errors(outs, ref)
                    del outs
                    ms = time_calls(lambda: ours(h, w, y, coef), device, warmup, reps)
                checks, ok = verdict(err, err_naive, ref_norms)
                row.update(status="ok", ms=statistics.median(ms), samples_ms=ms, extra_bytes=extra,
                           mem_method=method, accuracy=checks, accurate=ok,
                           ratio_to_4mm=statistics.median(ms) / doc["matmul"]["limit_4mm_ms"])
            except Exception as exc:  # noqa: BLE001
                row.update(status="error", error=f"{type(exc).__name__}: {str(exc)[:400]}")
            emit("variants", row)
            _free(device)
        doc["cublas_paths"] = dict(getattr(triton_ops, "PATHS", {}))
    doc["complete"] = True
    doc["elapsed_s"] = round(time.time() - started, 1)
    common.write_json(doc, out_path)
    _summary(doc)
    print(f"# wrote {out_path} ({doc['elapsed_s']:.0f} s)", flush=True)
    return 0


def _matmul(h, w, device):
    """One N.D.V product at the inputs' dtype (x4 = the floor of a fused fwd+bwd), and with fp32 output."""
    row = {}
    ms = time_calls(lambda: torch.mm(h, w.t()), device, 1, 3)
    row.update(ms=statistics.median(ms), limit_4mm_ms=4 * statistics.median(ms))
    if h.dtype != torch.float32:
        try:
            ms32 = time_calls(lambda: torch.mm(h, w.t(), out_dtype=torch.float32), device, 1, 3)
            row["fp32_out_ms"] = statistics.median(ms32)
        except (TypeError, RuntimeError) as exc:
            row["fp32_out_error"] = repr(exc)[:200]
    _free(device)
    return row


def _tiles(triton_ops, n, d, v):
    """(token group, vocabulary chunk) the Triton passes use under the current knobs, if exposed."""
    try:
        return list(triton_ops._tiles(n, d, v))
    except Exception:  # noqa: BLE001 - a private helper: the record only
        return None


def _free(device):
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class _unset:
    """Remove the given environment variables for the block (restored after)."""

    def __init__(self, names):
        self.names = list(names)

    def __enter__(self):
        self.old = {k: os.environ.pop(k) for k in self.names if k in os.environ}

    def __exit__(self, *exc):
        os.environ.update(self.old)
        return False


def _summary(doc):
    rows = sorted((r for r in doc["variants"] if r.get("status") == "ok"), key=lambda r: r["ms"])
    mm = doc["matmul"].get("limit_4mm_ms")
    print(f"# {doc['shape']['name']}: N={doc['shape']['N']} D={doc['shape']['D']} V={doc['shape']['V']} "
          f"{doc['shape']['dtype']}; 4 x mm = {mm:.2f} ms; naive "
          + (f"{doc['naive']['ms']:.2f} ms, " if doc["naive"].get("ms") else "")
          + f"extra {doc['naive'].get('extra_bytes', 0) / 2**20:.1f} MiB", flush=True)
    for r in rows:
        acc = "accurate" if r["accurate"] else "LESS ACCURATE THAN NAIVE: " + ", ".join(
            q for q, c in r["accuracy"].items() if not c["ok"])
        print(f"  {r['name']:<22} {r['ms']:9.2f} ms  extra {r['extra_bytes'] / 2**20:9.1f} MiB  "
              f"tiles {r['tiles']}  {acc}", flush=True)
    for r in doc["variants"]:
        if r.get("status") != "ok":
            print(f"  {r['name']:<22} {r['status']}: {r.get('error', '')[:120]}", flush=True)


def _git_commit():
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=os.path.dirname(os.path.abspath(__file__)),
                              capture_output=True, text=True, timeout=5).stdout.strip() or None
    except Exception:  # noqa: BLE001
        return None


if __name__ == "__main__":
    sys.exit(main())
