"""GPU benchmark suite: ours vs naive PyTorch, TRL, Liger-Kernel and Cut Cross-Entropy.

    python benchmarks/run_gpu.py                 # full plan, stops starting cases after --budget s
    python benchmarks/run_gpu.py --quick         # headline + one point per sweep
    python benchmarks/run_gpu.py --cases ours --cases naive
    python benchmarks/run_gpu.py --part core --pick-env "UPO_FWD_IMPL=cublas UPO_LOGITS=input"
                                                 # the headline DPO case alone (benchmarks/gpu_core.sh)
    python benchmarks/run_gpu.py --dry-run       # same code path on CPU at tiny sizes (ours_triton*
                                                 # under TRITON_INTERPRET=1, CUDA-only peers skipped)

Headline: bf16, N = 16k response tokens (4 pairs x 2 x 2048), D = 4096, V = 128256, fwd+bwd
of DPO and UPO for every peer; then length (N = 4k, 32k), vocab (N = 8k: 32000, 128256,
256000) and hidden (N = 8k: 2048, 8192) sweeps for ours / naive / CCE / TRL-chunked; Liger last.

The cases run in a worker process that this driver restarts if it dies (a sticky CUDA error
poisons a process); each case is recorded as soon as it ends, so a kill keeps what was
measured. Results: ``gpu[-dry-run][-<part>]-<date>.json`` in ``--out``, else ``$OUT``, else
``./bench-results/`` (git-ignored).
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

from benchmarks import common, plans, render  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STICKY = ("illegal memory access", "unspecified launch failure", "device-side assert", "CUDA error: an illegal",
          "misaligned address", "CUBLAS_STATUS_EXECUTION_FAILED", "illegal instruction")


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="headline + one point per sweep")
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes on CPU, CUDA-only peers skipped")
    ap.add_argument("--cases", action="append", default=[], help="glob over shape/peer/loss (repeatable)")
    ap.add_argument("--budget", type=float, default=290.0,
                    help="seconds after which no new case starts (default 290)")
    ap.add_argument("--grace", type=float, default=45.0,
                    help="seconds a case may run past the budget before the worker is killed")
    ap.add_argument("--part", choices=plans.GPU_PARTS, default="all",
                    help="core: the headline DPO case; extra: UPO at the headline and the sweeps; all: both")
    ap.add_argument("--pick-env", default=os.environ.get("UPO_BENCH_PICK_ENV", ""),
                    help="UPO_* knobs of ours_triton_pick, e.g. 'UPO_FWD_IMPL=cublas UPO_GROUP_MB=128' "
                         "(benchmarks/pick_default.py --print-env; default $UPO_BENCH_PICK_ENV; empty: no pick peer)")
    ap.add_argument("--out", default=None, help="output folder (default $OUT, else ./bench-results)")
    ap.add_argument("--name", default=None, help="JSON file name (default gpu[-dry-run][-PART]-<date>.json)")
    ap.add_argument("--max-restarts", type=int, default=3)
    # worker-only
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--events", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def get_plan(args):
    pick = bool(common.parse_env(args.pick_env))
    return plans.filter_plan(plans.gpu_plan(quick=args.quick, dry_run=args.dry_run, part=args.part, pick=pick),
                             args.cases)


# ----------------------------------------------------------------------------- worker
def _emit(f, event):
    f.write(json.dumps(event, default=str) + "\n")
    f.flush()
    os.fsync(f.fileno())


def _read_events(path):
    events = []
    if path and os.path.exists(path):
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line:
                    try:
                        events.append(json.loads(line))
                    except json.JSONDecodeError:
                        pass  # a line cut short by a kill
    return events


def worker(args):
    from benchmarks import harness, measure, peers
    from benchmarks.inputs import make_inputs

    peers.set_pick_env(common.parse_env(args.pick_env))
    device = "cpu" if args.dry_run else "cuda"
    timing = dict(harness.GPU_TIMING)
    if args.dry_run:
        timing.update(target_s=0.05, min_reps=1, max_reps=3, warmup=0)
    events = _read_events(args.events)
    done = {e["case"] for e in events if e.get("event") == "end"}
    shapes_done = {e["key"] for e in events if e.get("event") == "shape"}
    f = open(args.events, "a")
    if not any(e.get("event") == "env" for e in events):
        _emit(f, {"event": "env", "environment": harness.environment(device), "timing": timing})

    for item in get_plan(args):
        shape = item["shape"]
        pending = [c for c in item["cases"] if plans.case_key(shape, *c) not in done]
        if not pending:
            continue
        if time.time() > args.deadline:
            break
        try:
            inputs = make_inputs(shape, device)
        except Exception as exc:  # noqa: BLE001
            for peer, kind in pending:
                _emit(f, {"event": "end", "case": plans.case_key(shape, peer, kind), "record": {
                    "shape": shape.key, "peer": peer, "loss_kind": kind,
                    "status": "OOM" if harness.is_oom(exc) else "error",
                    "error": f"inputs: {type(exc).__name__}: {str(exc)[:300]}"}})
            harness.free(device)
            continue
        if shape.key not in shapes_done:
            info = shape.as_dict()
            try:
                info["matmul_limit"] = measure.matmul_limit(inputs["hidden"], inputs["weight"],
                                                            reps=3 if args.dry_run else 5, warmup=1)
            except Exception as exc:  # noqa: BLE001
                info["matmul_limit_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            harness.free(device)
            _emit(f, {"event": "shape", "key": shape.key, "info": info})
            shapes_done.add(shape.key)

        refs, failed = {}, {}
        for peer, kind in item["cases"]:
            key = plans.case_key(shape, peer, kind)
            if key in done:
                continue
            if time.time() > args.deadline:
                break
            kind_started = any(plans.case_key(shape, p, k) in done for p, k in item["cases"] if k == kind)
            candidate = peer in plans.REFERENCE_ORDER and kind not in refs and not kind_started
            if kind not in refs and not candidate:
                refs[kind] = compute_reference(inputs, kind, device, skip=failed.get(kind, ()))
            _emit(f, {"event": "start", "case": key, "t": time.time()})
            if os.environ.get("UPO_BENCH_CRASH_CASE") and os.environ["UPO_BENCH_CRASH_CASE"] in key:
                os._exit(9)  # test hook: a worker dying in the middle of a case
            record, outs = harness.run_case(inputs, peer, kind, device, timing, ref=refs.get(kind),
                                            want_outputs=candidate)
            if candidate and outs is not None:
                refs[kind] = outs
                record["is_reference"] = True
            if record.get("status") not in ("ok", "mismatch"):
                failed.setdefault(kind, set()).add(peer)
            if record.get("status") == "ok":
                record.pop("traceback", None)
            _emit(f, {"event": "end", "case": key, "record": record})
            done.add(key)
            if any(s in (record.get("error") or "") for s in STICKY):
                f.close()
                return 3  # the CUDA context is gone: let the driver start a fresh worker
        del inputs, refs
        harness.free(device)
    _emit(f, {"event": "worker_done"})
    f.close()
    return 0


def compute_reference(inputs, kind, device, skip=()):
    """Reference outputs (loss, S, grads) by the first reference peer that runs, unmeasured."""
    from benchmarks import harness, peers

    for peer in plans.REFERENCE_ORDER:
        if peer in skip:
            continue
        try:
            step, _ = peers.build(peer, inputs, kind)
            out = harness._finalize(harness._full_step(step, inputs)())
            out["peer"] = peer
            return out
        except Exception:  # noqa: BLE001 - try the next candidate
            harness.free(device)
    return None


# ----------------------------------------------------------------------------- driver
def assemble(events, plan, args, started):
    doc = {"suite": "gpu" if not args.dry_run else "gpu-dry-run", "part": args.part,
           "pick_env": common.parse_env(args.pick_env), "environment": {}, "shapes": {},
           "results": [], "plan": [plans.case_key(i["shape"], *c) for i in plan for c in i["cases"]],
           "peers": {p: v[0] for p, v in plans_peers().items()}, "peer_notes": peer_notes()}
    records = {}
    for e in events:
        if e.get("event") == "env":
            doc["environment"] = e["environment"]
            doc["timing"] = e.get("timing")
        elif e.get("event") == "shape":
            doc["shapes"][e["key"]] = e["info"]
        elif e.get("event") == "end":
            records[e["case"]] = e["record"]
    for i in plan:  # shape order of the plan, then any shapes only seen in events
        doc["shapes"].setdefault(i["shape"].key, i["shape"].as_dict())
    for key in doc["plan"]:
        r = records.get(key)
        if r is None:
            continue
        lim = doc["shapes"].get(r.get("shape"), {}).get("matmul_limit", {}).get("limit_ms")
        if r.get("median_ms") and lim:
            r["ratio_to_matmul_limit"] = r["median_ms"] / lim
        doc["results"].append(r)
    doc["elapsed_s"] = time.time() - started
    from benchmarks import harness

    doc["tolerances"] = harness.TOLERANCES
    return doc


def plans_peers():
    from benchmarks import peers

    return peers.PEERS


def peer_notes():
    from benchmarks import peers

    return peers.PEER_NOTES


_write = common.write_json


def driver(args):
    started = time.time()
    deadline = started + args.budget
    plan = get_plan(args)
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            print("# no CUDA device: nothing measured (use --dry-run to exercise the code on CPU)", flush=True)
            return 1
    common.parse_env(args.pick_env)  # a malformed pick fails here, not in the worker
    out_dir = common.out_dir(args.out)
    name = args.name or ("gpu" + ("-dry-run" if args.dry_run else "") + ("" if args.part == "all" else "-" + args.part)
                         + time.strftime("-%Y-%m-%d", time.gmtime()) + ".json")
    out_path = os.path.join(out_dir, name)
    events_path = os.path.join(tempfile.mkdtemp(prefix="upo-gpu-events-"), "events.jsonl")
    total = sum(len(i["cases"]) for i in plan)
    print(f"# GPU suite{' (dry run, CPU)' if args.dry_run else ''}, part {args.part}: {total} cases, budget "
          f"{args.budget:.0f} s; pick: {args.pick_env or '-'}; results -> {out_path}", flush=True)

    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    if args.dry_run:
        env["TRITON_INTERPRET"] = "1"  # ours_triton* run under the interpreter on CPU
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--events", events_path,
           "--deadline", str(deadline), "--budget", str(args.budget), "--part", args.part,
           "--pick-env", args.pick_env]
    for flag in ("quick", "dry_run"):
        if getattr(args, flag):
            cmd.append("--" + flag.replace("_", "-"))
    for c in args.cases:
        cmd += ["--cases", c]

    printed = set()
    restarts = 0
    current = {}

    def on_term(signum, frame):  # `timeout` or the caller gives up: take the worker down too
        if current.get("proc") is not None:
            _kill_group(current["proc"])
        print(f"# stopped by signal {signum}; {out_path} holds the cases finished so far", flush=True)
        sys.exit(128 + signum)

    import signal

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    while True:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True)
        current["proc"] = proc
        killed = False
        while proc.poll() is None:
            time.sleep(1.0)
            _progress(events_path, printed, plan, args, started, out_path)
            if time.time() > deadline + args.grace:
                _kill_group(proc)
                killed = True
        events = _read_events(events_path)
        open_case = _open_case(events)
        if open_case:
            status = "timeout" if killed else "crashed"
            why = (f"killed {args.grace:.0f} s past the {args.budget:.0f} s budget" if killed
                   else f"worker exited with code {proc.returncode} during this case (see the log)")
            shape_key, peer, kind = open_case.split("/")
            with open(events_path, "a") as f:
                _emit(f, {"event": "end", "case": open_case, "record": {
                    "shape": shape_key, "peer": peer, "loss_kind": kind, "status": status, "error": why}})
        _progress(events_path, printed, plan, args, started, out_path)
        pending = _pending(plan, _read_events(events_path))
        if not pending or killed or time.time() > deadline or proc.returncode == 0:
            break
        restarts += 1
        if restarts > args.max_restarts:
            break
        print(f"# worker exited with {proc.returncode}; restarting ({restarts}/{args.max_restarts})", flush=True)

    events = _read_events(events_path)
    for key in _pending(plan, events):
        shape_key, peer, kind = key.split("/")
        events.append({"event": "end", "case": key, "record": {
            "shape": shape_key, "peer": peer, "loss_kind": kind, "status": "budget",
            "error": f"not started within the {args.budget:.0f} s budget"}})
    doc = assemble(events, plan, args, started)
    if any(r.get("status") == "budget" for r in doc["results"]):
        doc["budget_note"] = f"Cases marked 'not run (time budget)' did not start within {args.budget:.0f} s."
    _write(doc, out_path)
    print(render.console_table(doc), flush=True)
    print(f"# wrote {out_path} ({doc['elapsed_s']:.0f} s)", flush=True)
    return 0


def _kill_group(proc):
    """The worker and anything it started (torch.compile's compile workers)."""
    import signal

    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        proc.kill()
    proc.wait()


def _open_case(events):
    started = [e["case"] for e in events if e.get("event") == "start"]
    ended = {e["case"] for e in events if e.get("event") == "end"}
    open_ = [c for c in started if c not in ended]
    return open_[-1] if open_ else None


def _pending(plan, events):
    ended = {e["case"] for e in events if e.get("event") == "end"}
    return [plans.case_key(i["shape"], *c) for i in plan for c in i["cases"]
            if plans.case_key(i["shape"], *c) not in ended]


def _progress(events_path, printed, plan, args, started, out_path):
    """Print newly finished cases and rewrite the JSON, so a kill keeps what was measured."""
    events = _read_events(events_path)
    new = False
    for e in events:
        if e.get("event") == "end" and e["case"] not in printed:
            printed.add(e["case"])
            print(render.console_line(e["record"]) + f"   [{time.time() - started:.0f} s]", flush=True)
            new = True
        elif e.get("event") == "shape" and "shape:" + e["key"] not in printed:
            printed.add("shape:" + e["key"])
            lim = e["info"].get("matmul_limit")
            print(f"{e['key']}: 4 x torch.mm = " + (f"{lim['limit_ms']:.2f} ms ({lim['tflops']:.0f} TFLOP/s)"
                                                    if lim else e["info"].get("matmul_limit_error", "?")), flush=True)
            new = True
    if new:
        _write(assemble(events, plan, args, started), out_path)


def main(argv=None):
    args = parse(argv)
    if args.worker:
        return worker(args)
    return driver(args)


if __name__ == "__main__":
    sys.exit(main())
