"""Per-token statistics of the softmax, and the exact merge of per-slice partial results.

The statistics TRL's fused LM head returns (its names, its definitions), computed in the same
pass over the logit tiles as the log-probs, on request. With ``x`` a token's ``V`` final logits
(after bias, ``logit_scale`` and soft cap), ``p = softmax(x)``, ``y`` its label:

    entropy           -sum_v p_v log p_v
    log_sum_sq_probs  log sum_v p_v^2                  (WPO's weights)
    mean_logits       sum_v x_v / V
    is_top1           1.0 if y is the argmax of x, ties to the first index (TRL's rule), else 0.0

Every backend reduces each vocabulary slice (a fused-kernel split, a cuBLAS tile, a chunked
tile) to numbers relative to the slice's own max ``m``: ``s = sum e``, ``u = sum e (x - m)``
(<= 0; the chunked backend forms it as ``sum e x - m s``, as TRL does) and ``q = sum e^2`` with
``e = exp(x - m)``, the slice's ``sum x``, the max of the logits
left of the label (``before``) and the label's logit when it falls in the slice. ``merge_parts``
re-expresses them at the global max ``M`` (``alpha = exp(m - M)``: ``s`` and ``u + (m - M) s`` scale
by ``alpha``, ``q`` by ``alpha^2``), so ``entropy = log S - U / S`` is a sum of two non-negative
terms (no cancellation against the log-normaliser) and ``log_sum_sq_probs = log Q - 2 log S``.
"""
from __future__ import annotations

import torch

from upo_kernels import buffers

STATS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
# row of each statistic's partial results in the [len(STATS), N, slices] buffer; for is_top1 the
# row holds the max logit left of the label
STAT_ROW = {name: k for k, name in enumerate(STATS)}
# Not a public statistic: each row's max logit, which a vocabulary shard contributes to the
# global is_top1 (``vocab_parallel.py``); any backend's merge has it, no kernel computes more.
MAX_LOGIT = "max_logit"


def check_stats(stats) -> tuple[str, ...]:
    """``stats`` (a name or a sequence of names) -> the requested names in ``STATS`` order.

    Raises ``ValueError`` naming the argument and the valid names for anything else."""
    if isinstance(stats, str):
        stats = (stats,)
    try:
        names = list(stats)
    except TypeError:
        raise ValueError(f"stats must be a sequence of names (valid: {', '.join(STATS)}), got {stats!r}") from None
    unknown = [s for s in names if s not in STATS]
    if unknown:
        raise ValueError(f"stats: unknown statistic {unknown[0]!r}; valid names are {', '.join(STATS)}")
    return tuple(s for s in STATS if s in names)


def kernel_flags(stats) -> dict:
    """The Triton kernels' constexpr switches (all False: today's code, nothing extra compiled)."""
    return {"HAS_ENTROPY": "entropy" in stats, "HAS_SUM_SQ": "log_sum_sq_probs" in stats,
            "HAS_MEAN": "mean_logits" in stats, "HAS_TOP1": "is_top1" in stats}


def part_buffer(n_tokens, slices, dtype, device):
    """The per-slice partial statistics, ``[len(STATS), N, slices]``, one row per statistic in
    ``STATS`` order (is_top1's row: the max logit left of the label, -inf where none). Every
    slice writes its column of each requested row (poisoned in tests)."""
    return buffers.empty((len(STATS), n_tokens, slices), dtype, device)


def merge_parts(part_max, part_sum, part_tgt, labels, ignore_index, parts=None, stats=(), vocab=None):
    """Per-slice (max, sum-exp, target) ``[N, S]`` (and ``parts``, see ``part_buffer``) ->
    ``(logp [N], lse [N])``, or ``(logp, lse, {name: [N]})`` when ``stats`` are asked; exact in
    the compute dtype. Ignored rows get 0 log-prob and 0 statistics."""
    top = part_max.max(dim=1).values
    alpha = torch.exp(part_max - top.unsqueeze(1))
    total = (part_sum * alpha).sum(dim=1)
    lse = top + torch.log(total)
    keep = labels != ignore_index
    target = part_tgt.sum(dim=1)
    logp = torch.where(keep, target - lse, torch.zeros_like(lse))
    if not stats:
        return logp, lse
    values = {}
    if "entropy" in stats:
        shifted = parts[STAT_ROW["entropy"]] + (part_max - top.unsqueeze(1)) * part_sum
        values["entropy"] = torch.log(total) - (alpha * shifted).sum(dim=1) / total
    if "log_sum_sq_probs" in stats:
        values["log_sum_sq_probs"] = (torch.log((alpha * alpha * parts[STAT_ROW["log_sum_sq_probs"]]).sum(dim=1))
                                      - 2 * torch.log(total))
    if "mean_logits" in stats:
        values["mean_logits"] = parts[STAT_ROW["mean_logits"]].sum(dim=1) / vocab
    if "is_top1" in stats:
        before = parts[STAT_ROW["is_top1"]].max(dim=1).values
        values["is_top1"] = ((target >= top) & (target > before)).to(lse.dtype)
    if MAX_LOGIT in stats:
        values[MAX_LOGIT] = top
    zero = torch.zeros((), dtype=lse.dtype, device=lse.device)
    return logp, lse, {name: torch.where(keep, v, zero) for name, v in values.items()}
