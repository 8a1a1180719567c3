"""Run one benchmark case: check agreement with the reference, then memory, then time.

A case is (shape, peer, loss kind). Its record holds the loss value, agreement with the
reference implementation (naive PyTorch at the same dtype; the chunked torch backend where
naive does not fit), first-call time (compilation, autotuning), median fwd+bwd time and the
peak extra memory of one fwd+bwd call:

    extra = peak during the call - memory held before it - returned gradients

so inputs, weight and the gradients every implementation must return are excluded and what
remains is the implementation's own working memory.
"""
from __future__ import annotations

import datetime as _dt
import gc
import os
import platform
import subprocess
import traceback

import torch

from benchmarks import measure, peers

# Agreement with the reference, by input dtype: relative error of the loss (|d| / max(|ref|, 1))
# and the relative Frobenius error of grad_hidden and grad_weight. These catch real mistakes
# (a wrong reduction, reference or token set gives errors of order 1), not rounding: the DPO
# margin is a difference of sums over thousands of tokens (|S| ~ 3e4 at T = 2048), so fp32
# summation order alone moves the loss by ~1e-3; in bf16 the naive path's own rounding of
# logits and their gradients sets the scale.
TOLERANCES = {
    "float32": {"loss": 2e-3, "grad": 2e-3},
    "float16": {"loss": 3e-2, "grad": 5e-2},
    "bfloat16": {"loss": 3e-2, "grad": 5e-2},
}

GPU_TIMING = {"target_s": 0.6, "min_reps": 3, "max_reps": 20, "warmup": 1, "count_memory_call": False}
CPU_TIMING = {"target_s": 6.0, "min_reps": 1, "max_reps": 5, "warmup": 0, "count_memory_call": True,
              "memory_on_first_call": True}


def is_oom(exc) -> bool:
    if isinstance(exc, (MemoryError, getattr(torch.cuda, "OutOfMemoryError", MemoryError))):
        return True
    text = str(exc)
    return "out of memory" in text.lower() or "can't allocate memory" in text


def free(device):
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def _rel_fro(a, b, rows=4096):
    """||a - b|| / ||b|| in fp32, a block of rows at a time (no full-size fp32 copies)."""
    a2, b2 = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    num = den = 0.0
    for i in range(0, a2.shape[0], rows):
        x, y = a2[i:i + rows].float(), b2[i:i + rows].float()
        num += float(((x - y) ** 2).sum())
        den += float((y ** 2).sum())
    return (num / max(den, 1e-300)) ** 0.5


def compare(out, ref, dtype: str) -> dict:
    """Errors of ``out`` against ``ref`` (dicts of loss, S, grad_hidden, grad_weight) and the verdict."""
    tol = TOLERANCES[dtype]
    loss_err = abs(out["loss"] - ref["loss"]) / max(abs(ref["loss"]), 1.0)
    res = {
        "loss_rel_err": loss_err,
        "grad_hidden_rel_err": _rel_fro(out["grad_hidden"], ref["grad_hidden"]),
        "grad_weight_rel_err": _rel_fro(out["grad_weight"], ref["grad_weight"]),
    }
    if out.get("S") is not None and ref.get("S") is not None:
        res["logps_rel_err"] = _rel_fro(out["S"].reshape(-1, 1).cpu(), ref["S"].reshape(-1, 1).cpu())
    bad = []
    if not loss_err <= tol["loss"]:
        bad.append(f"loss rel err {loss_err:.2e} > {tol['loss']:.0e}")
    for k in ("grad_hidden_rel_err", "grad_weight_rel_err"):
        if not res[k] <= tol["grad"]:
            bad.append(f"{k.replace('_rel_err', '')} rel err {res[k]:.2e} > {tol['grad']:.0e}")
    res["agree"] = not bad
    res["disagreement"] = "; ".join(bad)
    return res


def _full_step(step, inputs):
    """step() -> (loss, S) becomes run() -> loss, S and both grads, under the step's ``env``
    (peers.py: the UPO_* knobs of a variant) for forward and backward alike."""
    h, w = inputs["hidden"], inputs["weight"]
    env = getattr(step, "env", None) or {}

    def run():
        with measure.env_vars(**env):
            loss, S = step()
            gh, gw = torch.autograd.grad(loss, [h, w])
        return {"loss": loss.detach(), "S": None if S is None else S.detach(), "grad_hidden": gh, "grad_weight": gw}

    return run


def _finalize(out):
    out["loss"] = float(out["loss"])
    return out


COMPILING_PEERS = ("liger",)


def _memory(record, mem, res):
    grad_bytes = sum(res[k].numel() * res[k].element_size() for k in ("grad_hidden", "grad_weight"))
    record.update(base_bytes=mem.base, peak_bytes=mem.peak, grad_bytes=grad_bytes,
                  peak_extra_bytes=max(0, mem.peak - mem.base - grad_bytes), mem_method=mem.method)


def run_case(inputs, peer, loss_kind, device, timing, ref=None, want_outputs=False):
    """Measure one case. ``ref``: dict of reference outputs, a callable returning one (called
    after the measurements: CPU runner), or None (no comparison). Returns (record, outputs)
    where outputs (loss, S, grads) are kept only if ``want_outputs``."""
    shape = inputs["shape"]
    device = torch.device(device)
    record = {"shape": shape.key, "peer": peer, "loss_kind": loss_kind, "label": peers.PEERS[peer][0],
              "note": peers.PEER_NOTES.get(peer, ""), "status": "ok"}
    ok, why = peers.availability(peer, device)
    if not ok:
        record.update(status="skipped", note=why)
        return record, None
    phase = "build"
    out = None
    try:
        try:
            step, extra_note = peers.build(peer, inputs, loss_kind)
        except NotImplementedError as exc:
            record.update(status="n/a", note=str(exc))
            return record, None
        if extra_note:
            record["note"] = (record["note"] + "; " + extra_note).strip("; ")
        run = _full_step(step, inputs)
        timer = measure.Timer(device)

        # CPU: the first call of a fresh process sees a clean heap, so its RSS peak is exact;
        # peers that compile on their first call are measured on the second one instead.
        mem_first = timing.get("memory_on_first_call", False) and peer not in COMPILING_PEERS
        phase = "first call"
        if mem_first:
            with measure.PeakMemory(device) as mem:
                first_s, out = measure.wall(run, device)
            _memory(record, mem, out)
        else:
            first_s, out = measure.wall(run, device)
        out = _finalize(out)
        record["first_call_ms"] = first_s * 1e3
        record["loss"] = out["loss"]
        if out["S"] is not None:
            record["logps"] = [float(x) for x in out["S"].float().cpu()]
        if isinstance(ref, dict):
            record.update(compare(out, ref, shape.dtype))
            record["ref_peer"] = ref.get("peer")
        if not want_outputs and not callable(ref):
            out = None
        free(device)

        samples = []
        if not mem_first:
            phase = "memory"
            with measure.PeakMemory(device) as mem:
                t_mem, res = timer(run)
            _memory(record, mem, res)
            del res
            free(device)
            if timing.get("count_memory_call"):
                samples.append(t_mem)
            estimate = t_mem
        else:
            estimate = first_s

        phase = "timing"
        if estimate < timing.get("warmup_below_s", 1.0):  # slow calls are warm after two calls
            for _ in range(timing.get("warmup", 0)):
                run()
        reps = measure.repeat_count(estimate, timing["target_s"], timing["min_reps"], timing["max_reps"])
        for _ in range(max(0, reps - len(samples))):
            samples.append(timer(run)[0])
        record.update(measure.summarize(samples))
        record["compile_ms"] = max(0.0, record["first_call_ms"] - record["median_ms"])

        if callable(ref):
            phase = "compare"
            ref_out = ref()
            if ref_out is not None:
                record.update(compare(out, ref_out, shape.dtype))
                record["ref_peer"] = ref_out.get("peer")
            del ref_out
        if isinstance(record.get("agree"), bool) and not record["agree"]:
            record["status"] = "mismatch"
    except Exception as exc:  # noqa: BLE001 - every failure becomes part of the record
        record["status"] = "OOM" if is_oom(exc) else "error"
        record["error"] = f"{phase}: {type(exc).__name__}: {str(exc)[:500]}"
        record["traceback"] = traceback.format_exc()[-2000:]
        out = None
    finally:
        free(device)
    if out is not None and want_outputs:
        out["peer"] = peer
        return record, out
    return record, None


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit():
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True,
                              text=True, timeout=5)
        return head.stdout.strip() or None
    except Exception:  # noqa: BLE001
        return None


def environment(device) -> dict:
    device = torch.device(device)
    env = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device_type": device.type,
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "versions": peers.versions(),
        "git_commit": _git_commit(),
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    try:
        with open("/proc/meminfo") as f:
            env["host_memory_bytes"] = int(f.readline().split()[1]) * 1024
    except OSError:
        pass
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(device=torch.cuda.get_device_name(device), gpu_memory_bytes=props.total_memory,
                   sm_count=props.multi_processor_count, cuda=torch.version.cuda)
    else:
        env["device"] = f"CPU: {env['cpu']} ({os.cpu_count()} cores)"
    return env


def acceptance(results, shape_key, naive="naive", ours="ours_torch", mem_limit=0.05, time_limit=1.2):
    """The issue's CPU acceptance: ours' extra memory <= 5 % of naive's, time <= 1.2x naive."""
    out = {}
    measured = ("ok", "mismatch")
    for kind in ("dpo", "upo"):
        a = next((r for r in results if r["shape"] == shape_key and r["peer"] == ours
                  and r["loss_kind"] == kind and r["status"] in measured), None)
        b = next((r for r in results if r["shape"] == shape_key and r["peer"] == naive
                  and r["loss_kind"] == kind and r["status"] in measured), None)
        if not a or not b:
            continue
        mem_ratio = a["peak_extra_bytes"] / max(1, b["peak_extra_bytes"])
        time_ratio = a["median_ms"] / b["median_ms"]
        out[kind] = {"shape": shape_key, "memory_ratio": mem_ratio, "time_ratio": time_ratio,
                     "memory_ok": mem_ratio <= mem_limit, "time_ok": time_ratio <= time_limit,
                     "agrees": a.get("agree"), "disagreement": a.get("disagreement", ""),
                     "ours_extra_bytes": a["peak_extra_bytes"], "naive_extra_bytes": b["peak_extra_bytes"],
                     "ours_ms": a["median_ms"], "naive_ms": b["median_ms"],
                     "limits": {"memory_ratio": mem_limit, "time_ratio": time_limit}}
    return out
