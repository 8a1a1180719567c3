"""Render benchmark JSON files to markdown tables and PNG plots (matplotlib, Agg).

    python benchmarks/render.py bench-results/cpu-<date>.json [more.json ...] [--out DIR]

For each JSON: ``<stem>.md`` with the environment, the acceptance verdict (CPU), one table per
sweep, and per sweep a PNG of time and extra memory against the swept size
(``<stem>-<sweep>.png``). Columns are explained in benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

STATUS_SHORT = {"ok": "ok", "mismatch": "DISAGREES", "OOM": "OOM", "skipped": "skipped", "n/a": "n/a",
                "error": "error", "timeout": "timeout", "crashed": "crashed", "budget": "not run (time budget)"}
SWEEP_AXIS = {"length": ("N", "tokens N = 2BT"), "vocab": ("V", "vocabulary V"), "hidden": ("D", "hidden size D")}


def fmt_bytes(n):
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit in ("B", "KB") else f"{n:.1f} {unit}" if n < 100 else f"{n:.0f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def fmt_ms(x):
    if x is None:
        return "-"
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def agreement(r):
    if r.get("is_reference"):
        return "reference"
    if "agree" not in r:
        return "-"
    errs = f"loss {r['loss_rel_err']:.0e}, dH {r['grad_hidden_rel_err']:.0e}, dW {r['grad_weight_rel_err']:.0e}"
    return ("yes (" if r["agree"] else "NO (") + errs + ")"


def status(r):
    s = STATUS_SHORT.get(r.get("status"), r.get("status"))
    if r.get("status") in ("error", "crashed", "timeout") and r.get("error"):
        s += ": " + r["error"].splitlines()[0][:120]
    if r.get("status") == "skipped" and r.get("note"):
        s += ": " + r["note"][:80]
    return s


def console_line(r):
    head = f"{r.get('shape')} {r.get('peer'):>13} {r.get('loss_kind')}: "
    if r.get("status") not in ("ok", "mismatch"):
        return head + status(r)
    ratio = f" ({r['ratio_to_matmul_limit']:.2f}x mm limit)" if r.get("ratio_to_matmul_limit") else ""
    return (head + f"{fmt_ms(r.get('median_ms'))} ms{ratio}, first call {fmt_ms(r.get('first_call_ms'))} ms, "
            f"extra {fmt_bytes(r.get('peak_extra_bytes'))}, agree: {agreement(r)}"
            + ("" if r["status"] == "ok" else "  <-- " + r.get("disagreement", "")))


def _table(rows, header):
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)] if rows else [len(h) for h in header]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _row(r, short=True):
    return [r.get("shape", ""), r.get("peer", ""), r.get("loss_kind", ""),
            fmt_ms(r.get("median_ms")),
            f"{r['ratio_to_matmul_limit']:.2f}" if r.get("ratio_to_matmul_limit") else "-",
            fmt_ms(r.get("first_call_ms")), fmt_bytes(r.get("peak_extra_bytes")),
            ("ref" if r.get("is_reference") else "yes" if r.get("agree") else "NO" if "agree" in r else "-")
            if short else agreement(r),
            "" if r.get("status") == "ok" else status(r)[:60]]


HEADER = ["shape", "peer", "loss", "median ms", "x mm-limit", "first call ms", "extra memory", "agrees", "status"]


def console_table(doc):
    rows = [_row(r) for r in doc["results"]]
    out = [_table(rows, HEADER)]
    for kind, a in (doc.get("acceptance") or {}).items():
        out.append(f"acceptance ({kind}, {a['shape']}): ours/naive extra memory {a['memory_ratio']:.4f} "
                   f"(<= {a['limits']['memory_ratio']}: {'PASS' if a['memory_ok'] else 'FAIL'}), "
                   f"time {a['time_ratio']:.2f}x (<= {a['limits']['time_ratio']}: "
                   f"{'PASS' if a['time_ok'] else 'FAIL'})"
                   + ("" if a.get("agrees") else f"; DISAGREES with naive: {a.get('disagreement')}"))
    return "\n".join(out)


# ----------------------------------------------------------------------------- markdown
def _md_table(rows, header):
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c).replace("|", "/") for c in r) + " |" for r in rows]
    return "\n".join(out)


def _shape_label(info):
    return f"N={info['N']} (B={info['B']}, T={info['T']}), D={info['D']}, V={info['V']}, {info['dtype']}"


SWEEP_ORDER = ("acceptance", "headline", "length", "vocab", "hidden")


def _shape_order(info):
    sweeps = info.get("sweeps", [])
    first = min((SWEEP_ORDER.index(s) for s in sweeps if s in SWEEP_ORDER), default=len(SWEEP_ORDER))
    return (first, info.get("N", 0), info.get("V", 0), info.get("D", 0))


def markdown(doc, plots=()):
    env = doc["environment"]
    v = env.get("versions", {})
    lines = [f"## {doc['suite'].upper()} benchmark: {env.get('device')}", "",
             f"Date {env.get('date')}; torch {v.get('torch')}, triton {v.get('triton')}, "
             f"transformers {v.get('transformers')}, trl {v.get('trl')}, liger-kernel {v.get('liger_kernel')}, "
             f"cut-cross-entropy {v.get('cut_cross_entropy')}, upo {v.get('upo')}"
             + (f" (commit {env['git_commit']})" if env.get("git_commit") else "")
             + f"; {env.get('cpu_count')} CPU cores, {env.get('torch_threads')} torch threads.", ""]
    for kind, a in (doc.get("acceptance") or {}).items():
        lines.append(f"**Acceptance ({kind.upper()}, {a['shape']})**: ours (chunked torch) extra memory = "
                     f"{a['memory_ratio'] * 100:.2f} % of naive (limit {a['limits']['memory_ratio'] * 100:.0f} %: "
                     f"{'pass' if a['memory_ok'] else 'FAIL'}); time = {a['time_ratio']:.2f}x naive "
                     f"(limit {a['limits']['time_ratio']}x: {'pass' if a['time_ok'] else 'FAIL'}); "
                     + ("loss and gradients agree with naive." if a.get("agrees") else
                        f"**does not agree with naive**: {a.get('disagreement')}."))
        lines.append("")
    if doc.get("budget_note"):
        lines += [doc["budget_note"], ""]
    header = ["implementation", "loss", "fwd+bwd ms (median)", "x matmul limit", "first call ms",
              "extra memory", "agrees with reference", "status"]
    for key, info in sorted(doc["shapes"].items(), key=lambda kv: _shape_order(kv[1])):
        rs = [r for r in doc["results"] if r.get("shape") == key]
        if not rs:
            continue
        lim = info.get("matmul_limit", {})
        lines.append(f"### {_shape_label(info)} — sweeps: {', '.join(info.get('sweeps', [])) or '-'}")
        if lim:
            lines.append(f"Matmul limit (4 x torch.mm at {info['dtype']}): {lim['limit_ms']:.1f} ms "
                         f"({lim['tflops']:.1f} TFLOP/s).")
        lines.append("")
        rows = [[r["peer"], r["loss_kind"], fmt_ms(r.get("median_ms")),
                 f"{r['ratio_to_matmul_limit']:.2f}" if r.get("ratio_to_matmul_limit") else "-",
                 fmt_ms(r.get("first_call_ms")), fmt_bytes(r.get("peak_extra_bytes")), agreement(r),
                 status(r)] for r in rs]
        lines += [_md_table(rows, header), ""]
    notes = {p: n for p, n in doc.get("peer_notes", {}).items()
             if any(r.get("peer") == p and r.get("status") in ("ok", "mismatch") for r in doc["results"])}
    if notes:
        lines.append("Notes: " + " ".join(f"*{p}*: {n}." for p, n in notes.items()))
        lines.append("")
    for p in plots:
        lines += [f"![{os.path.basename(p)}]({os.path.basename(p)})", ""]
    return "\n".join(lines)


def sweep_series(doc, sweep, kind="dpo"):
    """{peer: [(x, median_ms, extra_bytes), ...]} over the shapes tagged with ``sweep``."""
    attr = SWEEP_AXIS[sweep][0]
    keys = {k: info for k, info in doc["shapes"].items() if sweep in info.get("sweeps", [])}
    series = {}
    for r in doc["results"]:
        info = keys.get(r.get("shape"))
        if info is None or r.get("loss_kind") != kind or r.get("status") not in ("ok", "mismatch"):
            continue
        series.setdefault(r["peer"], []).append((info[attr], r.get("median_ms"), r.get("peak_extra_bytes")))
    return {p: sorted(v) for p, v in series.items()}


def plot_sweep(doc, sweep, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = sweep_series(doc, sweep)
    if not series or all(len(v) < 2 for v in series.values()):
        return None
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
    for peer, pts in sorted(series.items()):
        xs = [p[0] for p in pts]
        ax_t.plot(xs, [p[1] for p in pts], marker="o", label=peer)
        ax_m.plot(xs, [max(p[2] or 0, 1024) / 2**20 for p in pts], marker="o", label=peer)
    lim = sorted((info[SWEEP_AXIS[sweep][0]], info["matmul_limit"]["limit_ms"]) for info in doc["shapes"].values()
                 if sweep in info.get("sweeps", []) and info.get("matmul_limit"))
    if len(lim) >= 2:
        ax_t.plot([x for x, _ in lim], [y for _, y in lim], "k--", label="4 x torch.mm")
    for ax, title in ((ax_t, "fwd+bwd time (ms)"), (ax_m, "extra memory (MiB, floor 1 KiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(SWEEP_AXIS[sweep][1])
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    ax_t.legend(fontsize=8)
    fig.suptitle(f"{doc['environment'].get('device')} — DPO, {sweep} sweep")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def render_files(paths, out_dir=None, stem=None):
    outputs = []
    for path in paths:
        with open(path) as f:
            doc = json.load(f)
        base = stem or os.path.splitext(os.path.basename(path))[0]
        folder = out_dir or os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        plots = []
        for sweep in SWEEP_AXIS:
            try:
                p = plot_sweep(doc, sweep, os.path.join(folder, f"{base}-{sweep}.png"))
            except ImportError:
                p = None
            if p:
                plots.append(p)
        md_path = os.path.join(folder, base + ".md")
        with open(md_path, "w") as f:
            f.write(markdown(doc, plots) + "\n")
        outputs.append(md_path)
    return outputs[0] if len(outputs) == 1 else outputs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+")
    ap.add_argument("--out", default=None, help="folder for .md and .png (default: beside each JSON, i.e. where "
                                                "the suite wrote it: ./bench-results unless asked otherwise)")
    args = ap.parse_args(argv)
    out = render_files(args.files, out_dir=args.out)
    print(out)


if __name__ == "__main__":
    if __package__ in (None, ""):
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
