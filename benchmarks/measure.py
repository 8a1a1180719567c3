"""Timing and peak-memory measurement, on CUDA and on CPU.

CUDA: time with CUDA events around each call (warm-up calls excluded, median reported);
memory from the caching allocator: ``max_memory_allocated()`` after
``reset_peak_memory_stats()``, minus ``memory_allocated()`` just before the call (inputs,
weight and anything else alive), so "peak" is what the call itself added at its worst;
``max_memory_reserved()`` (what the allocator holds from the device) beside it as ``reserved``.

CPU: time with ``perf_counter``; memory from the process's resident set. Before the call the
kernel's high-water mark is reset (``/proc/self/clear_refs`` <- 5, Linux >= 4.0; the mark it had,
the process's peak so far, is kept as ``before_reset``) and the current RSS is the baseline; after
it, ``VmHWM`` is the peak. Where the reset is refused a
sampling thread (0.5 ms) reads the RSS instead. Large CPU buffers must come back to the OS
when freed for this to be exact: run with ``MALLOC_MMAP_THRESHOLD_=65536`` (the CPU runner
does, in a fresh process per case).
"""
from __future__ import annotations

import contextlib
import gc
import os
import statistics
import threading
import time

import torch

PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


@contextlib.contextmanager
def env_vars(**values):
    """Set environment variables for the block (upo's kernels read ``UPO_*`` at each forward)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update({k: str(v) for k, v in values.items()})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return None


def current_rss():
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * PAGE
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _reset_hwm():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class _Sampler(threading.Thread):
    def __init__(self):
        super().__init__(daemon=True)
        self.peak = current_rss()
        self._stop_event = threading.Event()

    def run(self):
        while not self._stop_event.is_set():
            self.peak = max(self.peak, current_rss())
            time.sleep(0.0005)

    def stop(self):
        self._stop_event.set()
        self.join()
        self.peak = max(self.peak, current_rss())
        return self.peak


class PeakMemory:
    """``with PeakMemory(device) as m: call()`` -> ``m.base``, ``m.peak`` (bytes), ``m.method``."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.base = self.peak = None
        self.before_reset = self.reserved = None
        self.method = None
        self._sampler = None

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            self.method = "cuda max_memory_allocated"
        else:
            self.base = current_rss()
            self.before_reset = _status_kb("VmHWM")
            if _reset_hwm() and _status_kb("VmHWM") is not None:
                self.method = "RSS high-water mark (clear_refs reset)"
            else:
                self._sampler = _Sampler()
                self._sampler.start()
                self.method = "RSS sampled every 0.5 ms"
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
            self.reserved = torch.cuda.max_memory_reserved()
        elif self._sampler is not None:
            self.peak = self._sampler.stop()
        else:
            self.peak = _status_kb("VmHWM")
        return False

    @property
    def extra(self):
        return self.peak - self.base


class Timer:
    """Wall time of one call, synchronised: CUDA events on CUDA, perf_counter on CPU."""

    def __init__(self, device):
        self.device = torch.device(device)

    def __call__(self, fn):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3, out
        t0 = time.perf_counter()
        out = fn()
        return time.perf_counter() - t0, out


def wall(fn, device):
    """Wall time including host overheads (first calls: compilation, autotuning)."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def summarize(samples):
    return {
        "median_ms": statistics.median(samples) * 1e3,
        "min_ms": min(samples) * 1e3,
        "samples_ms": [round(s * 1e3, 3) for s in samples],
    }


def repeat_count(estimate_s, target_s, min_reps, max_reps):
    if estimate_s <= 0:
        return max_reps
    return int(max(min_reps, min(max_reps, round(target_s / estimate_s))))


def matmul_limit(hidden, weight, reps=5, warmup=1):
    """Time the four N.D.V products of a fused fwd+bwd with torch.mm at the inputs' dtype.

    forward logits ``H W^T`` (twice: forward and the backward's recompute), ``grad_H = G W``
    and ``grad_W = G^T H`` with ``G`` [N, V]. Returns ms per product and the sum ("limit").
    """
    device = hidden.device
    h = hidden.detach().reshape(-1, hidden.shape[-1])
    w = weight.detach()
    n, v = h.shape[0], w.shape[0]
    g = torch.empty(n, v, device=device, dtype=h.dtype)
    g.normal_(0, 1e-3)
    out_z = torch.empty(n, v, device=device, dtype=h.dtype)
    out_h = torch.empty_like(h)
    out_w = torch.empty_like(w)
    out_z.zero_()  # touch the pages once (CPU first-touch cost is not matmul time)
    timer = Timer(device)
    products = {
        "logits": lambda: torch.mm(h, w.t(), out=out_z),
        "grad_hidden": lambda: torch.mm(g, w, out=out_h),
        "grad_weight": lambda: torch.mm(g.t(), h, out=out_w),
    }
    result = {}
    for name, fn in products.items():
        for _ in range(warmup):
            fn()
        samples = [timer(fn)[0] for _ in range(reps)]
        result[name + "_ms"] = statistics.median(samples) * 1e3
    del g, out_z, out_h, out_w
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    limit = 2 * result["logits_ms"] + result["grad_hidden_ms"] + result["grad_weight_ms"]
    flop = 4 * 2.0 * n * h.shape[1] * v
    result.update(limit_ms=limit, tflops=flop / (limit / 1e3) / 1e12, flop=flop)
    return result
