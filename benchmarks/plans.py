"""What each suite measures: shapes (tagged by sweep) and the (peer, loss) cases per shape.

Order matters: per shape and loss kind the reference candidates come first (naive, then the
chunked torch backend, which stands in where naive does not fit), then the other peers.
"""
from __future__ import annotations

import fnmatch

from benchmarks.inputs import Shape, merge_shapes

REFERENCE_ORDER = ("naive", "ours_torch")


def _cases(peer_list, kinds):
    return [(p, k) for k in kinds for p in peer_list]


def _ordered(cases, first=REFERENCE_ORDER):
    """Reference candidates (``first``) lead within each loss kind; otherwise the given order."""
    out = []
    for kind in dict.fromkeys(k for _, k in cases):
        mine = [c for c in cases if c[1] == kind]
        refs = [c for r in first for c in mine if c[0] == r]
        out += refs + [c for c in mine if c not in refs]
    return out


# ----------------------------------------------------------------------------- CPU
CPU_ACCEPTANCE = Shape(4, 2048, 256, 32000, "float32", ("acceptance", "length"))


def cpu_plan(preset="default", full=False):
    """CPU suite (fp32). ``default``: the acceptance case with every peer plus short sweeps;
    ``quick``: the acceptance case only; ``smoke``: tiny shapes for the tests."""
    if preset == "smoke":
        s1 = Shape(1, 64, 32, 512, "float32", ("acceptance", "length"))
        s2 = Shape(1, 128, 32, 512, "float32", ("length",))
        every = ["naive", "ours_torch", "trl_chunked", "trl_selective", "liger_eager"]
        return [
            {"shape": s1, "cases": _ordered(_cases(every, ["dpo"]) + _cases(["naive", "ours_torch"], ["upo"]))},
            {"shape": s2, "cases": _ordered(_cases(["naive", "ours_torch"], ["dpo"]))},
        ]
    accept_peers = ["naive", "ours_torch", "trl_chunked", "trl_selective", "liger", "liger_eager",
                    "ours_torch_bigtiles"]
    upo_peers = ["naive", "ours_torch"] + (["trl_chunked", "trl_selective"] if full else [])
    if preset == "quick":
        accept_peers = ["naive", "ours_torch", "trl_chunked", "liger_eager"]
    plan = [{"shape": CPU_ACCEPTANCE,
             "cases": _ordered(_cases(accept_peers, ["dpo"]) + _cases(upo_peers, ["upo"]))}]
    if preset == "quick":
        return plan
    # Sweeps: naive vs ours (TRL's chunked function too along the length); the acceptance case
    # is the N = 16k point of the length sweep.
    length = [Shape(4, t, 256, 32000, "float32", ("length",)) for t in (256, 512, 1024)]
    vocab = [Shape(1, 256, 256, v, "float32", ("vocab",)) for v in (32000, 128256, 256000)]
    hidden = [Shape(1, 256, d, 32000, "float32", ("hidden",)) for d in (128, 256, 512, 1024)]
    for s in merge_shapes(length + vocab + hidden):
        peer_list = ["naive", "ours_torch"] + (["trl_chunked"] if "length" in s.sweeps else [])
        plan.append({"shape": s, "cases": _ordered(_cases(peer_list, ["dpo"]))})
    return plan


# ----------------------------------------------------------------------------- GPU
GPU_HEADLINE = Shape(4, 2048, 4096, 128256, "bfloat16", ("headline", "length"))
# Headline DPO: every peer and our variants (the probe's pick first among them: it decides the
# default), the slow peers after the fast ones. The chunked torch backend (many small tiles,
# seconds per call on a GPU) is left to the CPU suite.
GPU_HEADLINE_DPO = ["naive", "ours_triton", "ours_triton_pick", "trl_chunked", "liger", "cce",
                    "ours_triton_cublas_fwd", "ours_triton_input_logits", "trl_selective"]
GPU_HEADLINE_UPO = ["naive", "ours_triton", "ours_triton_pick", "ours_triton_input_logits", "trl_chunked"]
GPU_SWEEP_PEERS = ["naive", "ours_triton", "cce", "trl_chunked"]
GPU_PARTS = ("all", "core", "extra")


def gpu_plan(quick=False, dry_run=False, part="all", pick=False):
    """GPU suite (bf16). Headline N = 16k tokens (4 pairs x 2 x 2048), D 4096, V 128256, all
    peers on DPO and the lean ones on UPO; then a length sweep (N = 4k, 32k), a vocab sweep at
    N = 8k (32000, 128256, 256000) and a hidden sweep at N = 8k (2048, 8192). ``quick``: the
    headline, N = 32k and V = 256000. ``part``: ``core`` is the headline DPO case alone (what
    decides the default, benchmarks/gpu_core.sh), ``extra`` everything else (UPO at the headline,
    the sweeps: benchmarks/gpu_extra.sh), ``all`` both. ``pick``: include ``ours_triton_pick``
    (the kernel probe's pick). ``dry_run``: the same plan structure at tiny sizes (fp32, CPU),
    Liger uncompiled (a CPU ``torch.compile`` takes minutes on two cores)."""
    if part not in GPU_PARTS:
        raise ValueError(f"part must be one of {GPU_PARTS}, got {part!r}")
    if dry_run:
        mk = lambda B, T, D, V, tags: Shape(B, T, D, V, "float32", tags)  # noqa: E731
        # small enough for the Triton interpreter (ours_triton* run under it in a dry run)
        head = mk(2, 32, 16, 160, ("headline", "length"))
        length = [mk(2, t, 16, 160, ("length",)) for t in (16, 64)]
        vocab = [mk(2, 16, 16, v, ("vocab",)) for v in (128, 160, 320)]
        hidden = [mk(2, 16, d, 160, ("hidden",)) for d in (8, 16, 32)]
    else:
        head = GPU_HEADLINE
        length = [Shape(4, t, 4096, 128256, "bfloat16", ("length",)) for t in (512, 4096)]
        vocab = [Shape(4, 1024, 4096, v, "bfloat16", ("vocab",)) for v in (32000, 128256, 256000)]
        hidden = [Shape(4, 1024, d, 128256, "bfloat16", ("hidden",)) for d in (2048, 4096, 8192)]
    if quick:
        length, vocab, hidden = length[-1:], vocab[-1:], []
    tagged = {s.key: s for s in merge_shapes([head] + length + vocab + hidden)}  # union of sweep tags

    def peers_of(names):
        names = [p for p in names if pick or p != "ours_triton_pick"]
        return ["liger_eager" if dry_run and p == "liger" else p for p in names]

    head = tagged[head.key]
    headline = []
    if part in ("all", "core"):
        headline += _cases(peers_of(GPU_HEADLINE_DPO), ["dpo"])
    if part in ("all", "extra"):
        headline += _cases(peers_of(GPU_HEADLINE_UPO), ["upo"])
    plan = [{"shape": head, "cases": _ordered(headline, ("naive",))}]
    if part == "core":
        return plan
    seen = {head.key}
    for s in length + vocab + hidden:
        if s.key not in seen:
            seen.add(s.key)
            plan.append({"shape": tagged[s.key],
                         "cases": _ordered(_cases(peers_of(GPU_SWEEP_PEERS), ["dpo"]), ("naive",))})
    return plan


def case_key(shape, peer, kind):
    return f"{shape.key}/{peer}/{kind}"


def filter_plan(plan, patterns):
    """Keep the cases whose key ``shape/peer/loss`` matches one of the glob patterns (a bare
    word matches anywhere, e.g. ``naive`` or ``V256000``). Reference candidates stay when any
    other case of their shape and loss survives, so agreement can still be checked."""
    if not patterns:
        return plan

    def match(key):
        return any(fnmatch.fnmatch(key, p if any(c in p for c in "*?[") else f"*{p}*") for p in patterns)

    out = []
    for item in plan:
        kept = [c for c in item["cases"] if match(case_key(item["shape"], *c))]
        kinds = {k for _, k in kept}
        refs = [c for c in item["cases"] if c[0] in REFERENCE_ORDER and c[1] in kinds and c not in kept]
        if kept:
            out.append({"shape": item["shape"], "cases": _ordered(refs + kept)})
    return out
