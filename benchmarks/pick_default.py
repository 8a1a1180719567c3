"""Decide the Triton backend's default variant from the probe and the headline suite.

    python benchmarks/pick_default.py --probe OUT/probe_kernels.json --print-env
        # the fastest accurate variant as "UPO_FWD_IMPL=... UPO_LOGITS=... UPO_GROUP_MB=..."
        # (empty when it is the library default): what the suite measures as ours_triton_pick
    python benchmarks/pick_default.py --probe OUT/probe_kernels.json --suite OUT/gpu-core-<date>.json \\
        --steps OUT/steps.jsonl --out OUT/decision.json

The rule (benchmarks/NOTES.md, "How the default is decided"):

1. *accurate*: for the log-probs, ``grad_hidden`` and ``grad_weight`` of the probe's fwd+bwd,
   ``||ours - truth|| <= ||naive_bf16 - truth|| + 2e-4 ||truth||`` (truth: float64 on the exactly
   upcast inputs); *lean*: extra memory <= 1 % of the naive path's (measured in the same
   probe; 224 MB at the headline if naive was not measured).
2. the pick is the fastest variant that is accurate and lean. It replaces the library default
   only if it is faster by more than the run-to-run spread of both (max - min of their timed
   calls) and the GPU tests passed; otherwise the default stays.
3. the targets are checked on the suite's headline DPO case (``upo.fused_loss``, the full
   loss): time <= 110 ms (stretch 105 ms), faster than TRL's chunked path, Liger and CCE
   measured in the same run, extra memory <= 1 % of the naive path's.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402

TARGETS = {"time_ms": 110.0, "stretch_ms": 105.0, "memory_fraction_of_naive": 0.01,
           "faster_than": ["trl_chunked", "liger", "cce"]}
NAIVE_HEADLINE_EXTRA = 22.4e9  # measured on an H200, 2026-11-27 (benchmarks/results/h200-2026-11-27)
DEFAULT_KEYS = ("UPO_FWD_IMPL", "UPO_LOGITS", "UPO_GROUP_MB")
FALLBACK = {"liger": ("liger", "liger_eager")}  # the dry run measures Liger uncompiled


def load(path):
    if not path or not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def load_steps(path):
    steps = {}
    if path and os.path.exists(path):
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line:
                    try:
                        s = json.loads(line)
                        steps[s["step"]] = s
                    except (json.JSONDecodeError, KeyError):
                        pass
    return steps


def spread(r):
    s = r.get("samples_ms") or [r.get("ms", 0.0)]
    return max(s) - min(s)


def default_variant(probe):
    """The probe's row for the library default (``default_env`` as the probe read it)."""
    want = probe.get("default_env") or {}
    return next((r for r in probe.get("variants", []) if r.get("env")
                 and all(r["env"].get(k) == want.get(k) for k in DEFAULT_KEYS)), None)


def memory_limit(probe):
    naive_extra = (probe.get("naive") or {}).get("extra_bytes")
    base = naive_extra if naive_extra else NAIVE_HEADLINE_EXTRA
    return TARGETS["memory_fraction_of_naive"] * base, "probe naive" if naive_extra else "H200 2026-11-27 naive"


def judge_probe(probe):
    """Variants sorted by time with their verdicts; the pick; the default; the margin."""
    mem_limit, mem_from = memory_limit(probe)
    dry = bool((probe.get("meta") or {}).get("dry_run"))
    if dry:  # CPU RSS inside one process at tiny sizes: no memory verdict
        mem_from += "; not applied in a dry run"
    rows = []
    for r in probe.get("variants", []):
        row = {"name": r.get("name"), "env": r.get("env"), "status": r.get("status")}
        if r.get("status") == "ok":
            row.update(ms=r["ms"], spread_ms=spread(r), extra_bytes=r["extra_bytes"], tiles=r.get("tiles"),
                       accurate=bool(r.get("accurate")), lean=dry or r["extra_bytes"] <= mem_limit,
                       failed_accuracy=[q for q, c in (r.get("accuracy") or {}).items() if not c.get("ok")])
        else:
            row["error"] = r.get("error")
        rows.append(row)
    measured = sorted((r for r in rows if r["status"] == "ok"), key=lambda r: r["ms"])
    candidates = [r for r in measured if r["accurate"] and r["lean"]]
    pick = candidates[0] if candidates else None
    default_row = default_variant(probe)
    default = next((r for r in measured if default_row and r["name"] == default_row.get("name")), None)
    out = {"memory_limit_bytes": mem_limit, "memory_limit_from": mem_from, "variants": measured + [
        r for r in rows if r["status"] != "ok"], "pick": pick, "default": default,
        "fastest_accurate_any_memory": next((r for r in measured if r["accurate"]), None),
        "complete": bool(probe.get("complete")), "shape": probe.get("shape"), "meta": probe.get("meta")}
    if pick and default:
        margin = default["ms"] - pick["ms"]
        noise = max(default["spread_ms"], pick["spread_ms"])
        out.update(margin_ms=margin, noise_ms=noise, pick_is_default=pick["name"] == default["name"],
                   beats_default_beyond_noise=pick["name"] != default["name"] and margin > noise)
    return out


def pick_env(judged):
    """The pick's knobs, or {} when there is none or it is the default."""
    pick = judged.get("pick")
    if not pick or judged.get("pick_is_default"):
        return {}
    return {k: pick["env"][k] for k in DEFAULT_KEYS if k in pick["env"]}


def headline_records(suite):
    keys = [k for k, info in suite.get("shapes", {}).items() if "headline" in info.get("sweeps", [])]
    if not keys:
        return None, {}
    key = keys[0]
    recs = {r["peer"]: r for r in suite.get("results", []) if r.get("shape") == key and r.get("loss_kind") == "dpo"}
    return key, recs


def _measured(r):
    return r is not None and r.get("status") in ("ok", "mismatch") and r.get("median_ms") is not None


def judge_suite(suite):
    key, recs = headline_records(suite)
    if key is None:
        return {"error": "no headline shape in the suite JSON"}
    naive = recs.get("naive")
    naive_extra = naive.get("peak_extra_bytes") if _measured(naive) else None
    mem_limit = TARGETS["memory_fraction_of_naive"] * (naive_extra or NAIVE_HEADLINE_EXTRA)
    peers = {p: {"status": r.get("status"), "ms": r.get("median_ms"), "extra_bytes": r.get("peak_extra_bytes"),
                 "agrees": r.get("agree"), "note": r.get("note") if r.get("status") == "skipped" else None,
                 "error": (r.get("error") or "")[:200] or None}
             for p, r in recs.items()}
    ours = {}
    for p, r in recs.items():
        if not p.startswith("ours_triton") or not _measured(r):
            continue
        t = {"time_le_110ms": r["median_ms"] <= TARGETS["time_ms"],
             "time_le_105ms": r["median_ms"] <= TARGETS["stretch_ms"],
             "memory_le_1pct_naive": (r.get("peak_extra_bytes") or 0) <= mem_limit,
             "agrees_with_naive": r.get("agree")}
        for other in TARGETS["faster_than"]:
            o = next((recs[q] for q in FALLBACK.get(other, (other,)) if _measured(recs.get(q))), None)
            t[f"faster_than_{other}"] = (r["median_ms"] < o["median_ms"]) if o else None
        ours[p] = {"ms": r["median_ms"], "extra_bytes": r.get("peak_extra_bytes"), "note": r.get("note"),
                   "targets": t, "all_targets_met": all(v is True for k, v in t.items() if k != "time_le_105ms")}
    return {"shape": key, "memory_limit_bytes": mem_limit,
            "memory_limit_from": "suite naive" if naive_extra else "H200 2026-11-27 naive",
            "peers": peers, "ours": ours, "dry_run": suite.get("suite") == "gpu-dry-run",
            "elapsed_s": suite.get("elapsed_s")}


def decide(probe, suite=None, steps=None):
    steps = steps or {}
    doc = {"rule": __doc__.split("The rule", 1)[1].strip() if "The rule" in __doc__ else "", "targets": TARGETS,
           "steps": steps}
    tests = steps.get("gpu_tests")
    doc["gpu_tests_passed"] = None if tests is None else tests.get("rc") == 0
    judged = judge_probe(probe) if probe else None
    doc["probe"] = judged
    doc["suite"] = judge_suite(suite) if suite else None
    doc["dry_run"] = bool((probe or {}).get("meta", {}).get("dry_run")) or bool(doc["suite"] and doc["suite"].get("dry_run"))
    rec = {"default_env": None, "change": False, "reason": ""}
    if not judged or not judged.get("variants"):
        rec["reason"] = "no probe results: nothing decided"
    elif not judged.get("pick"):
        rec["reason"] = "no variant is both accurate and lean: the default stays"
    elif not judged.get("default"):
        rec["reason"] = "the default variant was not measured: no comparison"
        rec["default_env"] = pick_env(judged) or None
    elif judged.get("pick_is_default"):
        rec.update(default_env={}, reason="the library default is the fastest accurate, lean variant")
    elif not judged.get("beats_default_beyond_noise"):
        rec.update(default_env={}, reason=f"{judged['pick']['name']} is faster by {judged['margin_ms']:.2f} ms, "
                   f"within the run-to-run spread ({judged['noise_ms']:.2f} ms): the default stays")
    elif doc["gpu_tests_passed"] is False:
        rec.update(default_env={}, reason="the GPU tests failed: no default changes until they pass")
    else:
        rec.update(default_env=pick_env(judged), change=True,
                   reason=f"{judged['pick']['name']} is {judged['margin_ms']:.2f} ms faster than the default "
                   f"(spread {judged['noise_ms']:.2f} ms), accurate and lean"
                   + ("" if doc["gpu_tests_passed"] else "; GPU tests not run: check them before changing"))
    s = doc["suite"] or {}
    ours = s.get("ours", {})
    which = "ours_triton_pick" if rec.get("change") and "ours_triton_pick" in ours else "ours_triton"
    rec["suite_variant"] = which if which in ours else None
    rec["targets_met"] = ours.get(which, {}).get("targets") if which in ours else None
    rec["all_targets_met"] = ours.get(which, {}).get("all_targets_met") if which in ours else None
    if "ours_triton_pick" in ours and "ours_triton" in ours:
        rec["suite_pick_minus_default_ms"] = ours["ours_triton_pick"]["ms"] - ours["ours_triton"]["ms"]
    if doc["dry_run"]:
        rec["note"] = "dry run on CPU: tiny shapes, no GPU figure; the targets apply to the GPU headline only"
    doc["recommendation"] = rec
    doc["pick_env"] = common.format_env(pick_env(judged)) if judged else ""  # for gpu_extra.sh
    return doc


def summary_lines(doc):
    lines = []
    p = doc.get("probe") or {}
    if p.get("variants"):
        lines.append(f"probe ({(p.get('shape') or {}).get('name')}): memory limit "
                     f"{p['memory_limit_bytes'] / 2**20:.1f} MiB ({p['memory_limit_from']})")
        for r in p["variants"]:
            if r["status"] == "ok":
                flags = ("accurate" if r["accurate"] else "INACCURATE(" + ",".join(r["failed_accuracy"]) + ")") + \
                        ("" if r["lean"] else " OVER-MEMORY")
                lines.append(f"  {r['name']:<24} {r['ms']:9.2f} ms (+-{r['spread_ms']:.2f})  "
                             f"{r['extra_bytes'] / 2**20:8.1f} MiB  {flags}")
            else:
                lines.append(f"  {r['name']:<24} {r['status']}: {(r.get('error') or '')[:100]}")
    s = doc.get("suite") or {}
    if s.get("peers"):
        lines.append(f"suite headline DPO ({s['shape']}):")
        for peer, r in s["peers"].items():
            lines.append(f"  {peer:<26} {r['status']:<9} " + (f"{r['ms']:9.2f} ms  {(r['extra_bytes'] or 0) / 2**20:9.1f} MiB"
                                                              if r.get("ms") is not None else (r.get("note") or r.get("error") or "")[:80]))
    rec = doc["recommendation"]
    lines.append(f"tests passed: {doc['gpu_tests_passed']}; decision: "
                 + (f"make {common.format_env(rec['default_env'])} the default" if rec.get("change") else "keep the default")
                 + f" ({rec['reason']})")
    if rec.get("targets_met") is not None:
        lines.append(f"targets ({rec['suite_variant']}): " + ", ".join(f"{k}={v}" for k, v in rec["targets_met"].items()))
    if rec.get("note"):
        lines.append(rec["note"])
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--probe", required=True, help="probe_kernels.json")
    ap.add_argument("--suite", default=None, help="the suite's JSON (run_gpu.py --part core)")
    ap.add_argument("--steps", default=None, help="steps.jsonl of gpu_core.sh (each step's exit code)")
    ap.add_argument("--out", default=None, help="decision JSON (default: decision.json in $OUT or ./bench-results)")
    ap.add_argument("--print-env", action="store_true", help="print the pick's knobs (empty: default) and exit")
    args = ap.parse_args(argv)
    probe = load(args.probe)
    if args.print_env:
        print(common.format_env(pick_env(judge_probe(probe))) if probe else "")
        return 0
    doc = decide(probe, load(args.suite), load_steps(args.steps))
    doc["inputs"] = {"probe": args.probe, "suite": args.suite, "steps": args.steps}
    out = args.out or os.path.join(common.out_dir(None), "decision.json")
    common.write_json(doc, out)
    print("\n".join(summary_lines(doc)))
    print(f"# wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
