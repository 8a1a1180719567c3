"""The cost of the kernels' first-use check (upo_kernels/first_use_check.py), in CPU time on the torch backend.

    python -m benchmarks.first_use_check_cost --out /tmp/check.json
    python -m benchmarks.first_use_check_cost --smoke       # tiny shapes

The check runs once per kernel configuration and process, on CUDA. Its work does not grow with the call: a
slice of 64 rows (48 labelled) against the weight's first 2053 rows, through the kernels and the torch backend
(16-bit inputs: also an fp32 truth and the naive 16-bit path). Here the torch backend stands in for the Triton
kernels, so both sides are CPU work, timed with one thread (``time.process_time``) beside one
``linear_logprobs`` forward + backward on the torch backend at the same shape; FLOPs are counted as 2 per
multiply-add of the matrix products.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from upo_kernels import chunked, first_use_check, linear_logprobs  # noqa: E402

SHAPES = {"small": (2048, 1024, 32000), "headline-ish": (512, 4096, 128256)}  # N, D, V
SMOKE_SHAPES = {"smoke": (40, 32, 300)}


class TorchAsKernels:
    """The chunked backend under the Triton backend's call signature (its variant options dropped)."""

    @staticmethod
    def forward(*args, fwd_impl, logits, **kwargs):
        return chunked.linear_logprobs_forward(*args, **kwargs)

    @staticmethod
    def backward(*args, fwd_impl, logits, **kwargs):
        return chunked.linear_logprobs_backward(*args, **kwargs)


def inputs(n, d, v, dtype):
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, d, generator=generator).to(dtype)
    weight = (torch.randn(v, d, generator=generator) * 3 / d**0.5).to(dtype)
    labels = torch.randint(0, v, (n,), generator=generator)
    return hidden, weight, labels


def cpu_seconds(fn, reps):
    times = []
    for _ in range(reps):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return min(times)


def check_flops(d, v, dtype):
    """Matrix-product FLOPs of the check: 6 n V D per forward + backward (logits twice, dH, dW), for the
    kernels and the torch backend; 16-bit adds the fp32 truth, the naive path and the statistics' logits."""
    n, vocab = 3 * first_use_check.SLICE_ROWS // 4, min(v, first_use_check.SLICE_VOCAB)
    runs = 2 if dtype == torch.float32 else 4
    return runs * 6 * n * vocab * d


def measure(shapes, reps):
    rows = []
    options = {"fwd_impl": "fused", "logits": "fp32"}
    for name, (n, d, v) in shapes.items():
        for dtype in (torch.float32, torch.bfloat16):
            hidden, weight, labels = inputs(n, d, v, dtype)

            def check():
                problem = first_use_check._first_use_problem(TorchAsKernels, options, hidden, weight, None, labels,
                                                             1.0, None, -100, ())
                assert problem is None, problem

            def one_call():
                h = hidden.detach().requires_grad_(True)
                w = weight.detach().requires_grad_(True)
                linear_logprobs(h, w, labels, backend="torch").sum().backward()

            check_s = cpu_seconds(check, reps)
            call_s = cpu_seconds(one_call, 1 if name == "headline-ish" else reps)
            row = dict(shape=name, n=n, d=d, v=v, dtype=str(dtype).replace("torch.", ""), check_cpu_s=check_s,
                       call_cpu_s=call_s, ratio=check_s / call_s, check_flops=check_flops(d, v, dtype),
                       call_flops=6 * n * v * d)
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", default=None)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    doc = {"threads": 1, "torch": torch.__version__, "rows": measure(SMOKE_SHAPES if args.smoke else SHAPES,
                                                                     1 if args.smoke else args.reps)}
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=2)
    return doc


if __name__ == "__main__":
    main()
