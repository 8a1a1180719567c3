"""Per-sequence quantities built from per-token values, as TRL 1.16's ``DPOTrainer`` builds them.

Tokens are the flattened ``[N]`` rows of ``upo.fused`` with ``seq_ids`` (the sequence of each
token; sequences are contiguous, chosen ``0..B-1`` then rejected ``B..2B-1``) and ``keep``
(``labels != ignore_index``: TRL's shifted completion mask, the EOS included when labelled).
Sums run in float64 and come back in the values' dtype.
"""
from __future__ import annotations

import torch


def sums64(values, seq_ids, rows):
    """``[N]`` per-token values (0 where ignored) -> ``[R]`` float64 sums, differentiable."""
    return torch.zeros(rows, dtype=torch.float64, device=values.device).index_add(0, seq_ids, values.double())


def per_sequence_sum(values, seq_ids, rows):
    """``sums64`` in the values' dtype: summing thousands of fp32 log-probs one by one in fp32
    loses ~1e-2 absolute."""
    return sums64(values, seq_ids, rows).to(values.dtype)


def shared_prefix(keep, seq_ids, counts):
    """LD-DPO's shared part: each sequence's first ``min(n_c, n_r)`` response tokens of its pair
    (``n`` its labelled tokens), counted in order over the labelled tokens only, as TRL's
    ``comp_pos = shift_completion_mask.cumsum(1)`` and ``shared_mask = 0 < comp_pos <= shared_len``."""
    half = counts.shape[0] // 2
    before = torch.cumsum(counts, 0) - counts  # labelled tokens of the earlier sequences
    position = torch.cumsum(keep.to(torch.int64), 0) - before[seq_ids]  # 1, 2, ... on labelled tokens
    shared_len = torch.minimum(counts[:half], counts[half:]).repeat(2)
    return keep & (position <= shared_len[seq_ids])


def shared_prefix_labels(labels, ignore_index=-100):
    """Padded ``[2B, T]`` labels (B chosen rows, then B rejected) keeping only each pair's first
    ``min(n_chosen, n_rejected)`` labelled tokens: summed log-probs over them are LD-DPO's shared sums
    (the same tokens as :func:`shared_prefix`), for callers that precompute reference sums."""
    valid = labels != ignore_index
    position = valid.cumsum(dim=1)  # 1, 2, ... over a row's labelled tokens
    counts = valid.sum(dim=1)
    half = labels.shape[0] // 2
    shared = torch.minimum(counts[:half], counts[half:]).repeat(2)
    return labels.masked_fill(position > shared.unsqueeze(1), ignore_index)


def shared_sums(logp, shared, seq_ids, rows):
    """``[R]`` sums of the per-token log-probs over the shared prefix (with gradient)."""
    return per_sequence_sum(torch.where(shared, logp, torch.zeros_like(logp)), seq_ids, rows)


@torch.no_grad()
def wpo_weights(logp, log_sum_sq_probs, keep, seq_ids, counts):
    """WPO's detached ``[R]`` weights: ``exp(mean over the response of (log p_t(y_t) - log sum_v p_t(v)^2))``
    (TRL 1.16: policy log-probs without LD weighting, divided by the labelled length, not clamped)."""
    aligned = torch.where(keep, logp - log_sum_sq_probs, torch.zeros_like(logp))
    return torch.exp(sums64(aligned, seq_ids, counts.shape[0]) / counts.clamp(min=1)).to(logp.dtype)


@torch.no_grad()
def token_metrics(stats, seq_ids, counts):
    """TRL's logged token metrics from per-token statistics (one host sync):

    ``entropy`` (token mean over chosen and rejected responses), ``mean_token_accuracy`` (share of
    chosen response tokens whose label is the top-1 token), ``logits/chosen`` and
    ``logits/rejected`` (token means of the mean logit); 0.0 where there is no token."""
    return token_metrics_of_sums(stat_sums64(stats, seq_ids, counts.shape[0]), counts)


@torch.no_grad()
def stat_sums64(stats, seq_ids, rows):
    """``{name: [N]}`` per-token statistics -> ``{name: [R]}`` float64 sums per sequence."""
    return {name: sums64(v, seq_ids, rows) for name, v in stats.items()}


@torch.no_grad()
def token_metrics_of_sums(sums, counts):
    """:func:`token_metrics` from per-sequence sums (``stat_sums64``) and counts: what a sequence split over
    processes (context parallelism) sums over them first."""
    half = counts.shape[0] // 2
    n = counts.double()
    parts = torch.stack([sums["entropy"].sum(), n.sum(), sums["is_top1"][:half].sum(), n[:half].sum(),
                         sums["mean_logits"][:half].sum(), sums["mean_logits"][half:].sum(), n[half:].sum()])
    ent, n_all, top1, n_chosen, logit_c, logit_r, n_rejected = parts.tolist()

    def ratio(a, b):
        return a / b if b > 0 else 0.0

    return {"entropy": ratio(ent, n_all), "mean_token_accuracy": ratio(top1, n_chosen),
            "logits/chosen": ratio(logit_c, n_chosen), "logits/rejected": ratio(logit_r, n_rejected)}
