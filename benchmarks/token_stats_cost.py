"""The cost of the token statistics on the CPU suite's acceptance case (chunked torch backend).

    python -m benchmarks.token_stats_cost               # N = 16k, D = 256, V = 32000, fp32, 5 rounds
    python -m benchmarks.token_stats_cost --reps 9 --out /tmp/stats.json
    python -m benchmarks.token_stats_cost --threads 1 --variants kernel kernel_all_stats
    python -m benchmarks.token_stats_cost --smoke       # tiny shape (tests)

Four variants of one DPO fwd+bwd (``torch.autograd.grad`` of the loss w.r.t. hidden and weight),
run in interleaved rounds (the order rotates each round) so that the drift of a shared machine
hits every variant alike:

    kernel            linear_logprobs(stats=()) -> per-sequence sums -> DPO sigmoid loss
    kernel_all_stats  the same with stats=TOKEN_STATS (all four statistics)
    fused_loss        upo.fused_loss(loss_type="sigmoid"), the suite's ``ours_torch`` case
    fused_loss_stats  the same with token_stats=True (what upo-train runs: three statistics + metrics)

Reported per variant: median, min and max of the wall time and of the process CPU time; per
pair (stats vs without), the median and range of the per-round ratios (each round's two calls
are close in time). On a shared machine the wall time follows the other tenants' load; with
``--threads 1`` the CPU time (no thread waits on another) measures the work itself.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks import harness, plans  # noqa: E402
from benchmarks.inputs import Shape, make_inputs  # noqa: E402

PAIRS = (("kernel_all_stats", "kernel"), ("fused_loss_stats", "fused_loss"))


def _steps(inputs):
    import upo
    from upo_kernels import TOKEN_STATS, linear_logprobs

    h, w, y = inputs["hidden"], inputs["weight"], inputs["labels"]
    ref = inputs["ref_logps"]
    half = ref.shape[0] // 2
    beta = inputs["beta"]

    def kernel(stats):
        out = linear_logprobs(h.reshape(-1, h.shape[-1]), w, y.reshape(-1), backend="torch", stats=stats)
        logp = out.logp if stats else out
        sums = logp.view(y.shape).double().sum(1).float()
        margin = (sums[:half] - ref[:half]) - (sums[half:] - ref[half:])
        return -F.logsigmoid(beta * margin).mean()

    def fused(token_stats):
        return upo.fused_loss(h, w, y, ref_chosen_logps=ref[:half], ref_rejected_logps=ref[half:], beta=beta,
                              loss_type="sigmoid", backend="torch", token_stats=token_stats).loss

    return {"kernel": lambda: kernel(()), "kernel_all_stats": lambda: kernel(TOKEN_STATS),
            "fused_loss": lambda: fused(False), "fused_loss_stats": lambda: fused(True)}


def _summary(values):
    return {"median_s": statistics.median(values), "min_s": min(values), "max_s": max(values), "times_s": values}


def _ratios(times, names):
    out = {}
    for stats_name, base in PAIRS:
        if stats_name not in names or base not in names:
            continue
        per_round = [a / b for a, b in zip(times[stats_name], times[base])]
        out[f"{stats_name}/{base}"] = {
            "median_ratio": statistics.median(per_round), "min_ratio": min(per_round), "max_ratio": max(per_round),
            "ratio_of_medians": statistics.median(times[stats_name]) / statistics.median(times[base]),
            "per_round": per_round}
    return out


def measure(shape, reps, names=None, log=print):
    inputs = make_inputs(shape, "cpu")
    steps = _steps(inputs)
    names = list(names or steps)
    grads_of = [inputs["hidden"], inputs["weight"]]

    def once(name):
        w0, c0 = time.perf_counter(), time.process_time()
        torch.autograd.grad(steps[name](), grads_of)
        return time.perf_counter() - w0, time.process_time() - c0

    for name in names:  # warm-up: allocator, threads, first-call paths
        once(name)
    wall, cpu = ({name: [] for name in names} for _ in range(2))
    for r in range(reps):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            w, c = once(name)
            wall[name].append(w)
            cpu[name].append(c)
        log(f"round {r + 1}/{reps}: " + ", ".join(f"{n} {wall[n][-1]:.2f} s wall / {cpu[n][-1]:.2f} s cpu"
                                                  for n in names) + f" (load {os.getloadavg()[0]:.1f})")
    return {"shape": shape.as_dict(), "reps": reps, "threads": torch.get_num_threads(),
            "wall": {n: _summary(t) for n, t in wall.items()}, "cpu": {n: _summary(t) for n, t in cpu.items()},
            "wall_ratios": _ratios(wall, names), "cpu_ratios": _ratios(cpu, names)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5, help="interleaved rounds (default 5)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--variants", nargs="+", default=None, help="a subset of the variants")
    ap.add_argument("--smoke", action="store_true", help="tiny shape, 2 rounds")
    ap.add_argument("--out", default=None, help="JSON path (default: print only)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = Shape(1, 64, 32, 512, "float32") if args.smoke else plans.CPU_ACCEPTANCE
    reps = 2 if args.smoke else args.reps
    env = harness.environment("cpu")
    print(f"# token-statistics cost, {shape.key}, {env['device']}, {env['torch_threads']} threads, {env['date']}")
    doc = {"environment": env, **measure(shape, reps, args.variants)}
    for clock in ("wall", "cpu"):
        for name, v in doc[clock].items():
            print(f"{clock:4s} {name:18s} median {v['median_s']:.3f} s  (min {v['min_s']:.3f}, max {v['max_s']:.3f})")
        for pair, v in doc[f"{clock}_ratios"].items():
            print(f"{clock:4s} {pair:30s} per-round ratio: median {v['median_ratio']:.3f} "
                  f"(range {v['min_ratio']:.3f}-{v['max_ratio']:.3f}); ratio of medians {v['ratio_of_medians']:.3f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=1)
    return doc


if __name__ == "__main__":
    main()
