"""CPU benchmark suite: every case in a fresh process, peak RSS above the inputs' baseline.

    python -m benchmarks.run_cpu              # acceptance case + short sweeps (fp32)
    python -m benchmarks.run_cpu --quick      # acceptance case only, fewer peers
    python -m benchmarks.run_cpu --cases liger --cases 'B4-T2048*'

The acceptance case of the issue is N = 16k response tokens (4 pairs x 2 x 2048), D = 256,
V = 32000, fp32, fwd+bwd of a DPO loss: the chunked torch backend must use <= 5 % of the
naive path's extra memory and <= 1.2x its time. Results: ``cpu-<date>.json`` in ``--out``, else
``$OUT``, else ``./bench-results/`` (git-ignored), rendered to markdown beside it.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common, harness, measure, plans, render  # noqa: E402
from benchmarks.inputs import make_inputs  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child_env():
    env = dict(os.environ)
    # Large buffers straight from / back to the OS (RSS follows allocations); the fixed
    # threshold also stops glibc from raising it after the first big free.
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(4 << 20))
    env.pop("TRITON_INTERPRET", None)  # CPU peers run their torch paths
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def run_child(spec, workdir, timeout):
    spec_path = os.path.join(workdir, "spec.json")
    result_path = os.path.join(workdir, "result.json")
    if os.path.exists(result_path):
        os.remove(result_path)
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    cmd = [sys.executable, "-m", "benchmarks.cpu_case", spec_path, result_path]
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "error": f"killed after {timeout} s"}
    if proc.returncode != 0 or not os.path.exists(result_path):
        tail = (proc.stderr or proc.stdout or "")[-1500:]
        return {"status": "error", "error": f"case process exited with {proc.returncode}: {tail}"}
    with open(result_path) as f:
        record = json.load(f)
    record["process_s"] = time.time() - t0
    return record


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="acceptance case only, fewer peers")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (tests)")
    ap.add_argument("--full", action="store_true", help="UPO for the TRL peers too at the acceptance case")
    ap.add_argument("--cases", action="append", default=[], help="glob over shape/peer/loss (repeatable)")
    ap.add_argument("--out", default=None, help="output folder (default $OUT, else ./bench-results)")
    ap.add_argument("--name", default=None, help="JSON file name (default cpu-<date>.json)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per case process")
    ap.add_argument("--no-limit", action="store_true", help="skip the torch.mm matmul-limit timing")
    ap.add_argument("--no-render", action="store_true")
    args = ap.parse_args(argv)

    preset = "smoke" if args.smoke else "quick" if args.quick else "default"
    plan = plans.filter_plan(plans.cpu_plan(preset, full=args.full), args.cases)
    timing = dict(harness.CPU_TIMING)
    if args.smoke:
        timing.update(target_s=0.05, max_reps=3)
    out_dir = common.out_dir(args.out)
    env = harness.environment("cpu")
    name = args.name or f"cpu-{env['date'][:10]}.json"
    out_path = os.path.join(out_dir, name)
    doc = {"suite": "cpu", "environment": env, "preset": preset, "timing": timing,
           "tolerances": harness.TOLERANCES, "peers": {p: v[0] for p, v in harness.peers.PEERS.items()},
           "peer_notes": harness.peers.PEER_NOTES, "shapes": {}, "results": []}
    print(f"# CPU suite ({preset}) on {env['device']}, torch {env['versions']['torch']}", flush=True)

    t_start = time.time()
    with tempfile.TemporaryDirectory(prefix="upo-bench-") as tmp:
        for item in plan:
            shape = item["shape"]
            info = doc["shapes"].setdefault(shape.key, shape.as_dict())
            inputs = make_inputs(shape, "cpu")  # precomputes the reference sums, once per shape
            ref_logps = [float(x) for x in inputs["ref_logps"]]
            if not args.no_limit and "matmul_limit" not in info:
                info["matmul_limit"] = measure.matmul_limit(inputs["hidden"], inputs["weight"], reps=1,
                                                            warmup=0 if shape.N * shape.V > 1 << 26 else 1)
                print(f"{shape.key}: 4 x torch.mm = {info['matmul_limit']['limit_ms']:.1f} ms", flush=True)
            del inputs
            ref_files = {}
            for peer, kind in item["cases"]:
                candidate = peer in plans.REFERENCE_ORDER and kind not in ref_files
                save = os.path.join(tmp, f"{shape.key}-{kind}-{peer}.pt") if candidate else None
                spec = {"shape": shape.as_dict(), "peer": peer, "loss_kind": kind, "ref_logps": ref_logps,
                        "timing": timing, "ref_file": ref_files.get(kind), "save_outputs": save}
                load_before = os.getloadavg()[0]
                record = run_child(spec, tmp, args.timeout)
                record["load_avg_1m"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
                record.setdefault("shape", shape.key)
                record.setdefault("peer", peer)
                record.setdefault("loss_kind", kind)
                if candidate and record.get("saved_outputs"):
                    ref_files[kind] = record["saved_outputs"]
                    record["is_reference"] = True
                lim = info.get("matmul_limit", {}).get("limit_ms")
                if record.get("median_ms") and lim:
                    record["ratio_to_matmul_limit"] = record["median_ms"] / lim
                doc["results"].append(record)
                print(render.console_line(record), flush=True)
                doc["elapsed_s"] = time.time() - t_start
                _write(doc, out_path)
    key = plans.CPU_ACCEPTANCE.key if not args.smoke else plan[0]["shape"].key
    doc["acceptance"] = harness.acceptance(doc["results"], key)
    doc["elapsed_s"] = time.time() - t_start
    _write(doc, out_path)
    print(render.console_table(doc), flush=True)
    print(f"# wrote {out_path} ({doc['elapsed_s']:.0f} s)", flush=True)
    if not args.no_render:
        try:
            md = render.render_files([out_path], out_dir=os.path.dirname(out_path),
                                     stem=os.path.splitext(os.path.basename(out_path))[0])
            print(f"# rendered {md}", flush=True)
        except Exception as exc:  # noqa: BLE001 - rendering is a convenience
            print(f"# render failed: {exc}", flush=True)
    return doc


_write = common.write_json


if __name__ == "__main__":
    main()
