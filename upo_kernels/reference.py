"""Float64 naive formulas: the test oracle. Materialises the logits; never use it for training.

All functions upcast to float64 and stay differentiable, so tests can take gradients with
respect to float64 leaves and compare them with a backend's gradients.
"""
from __future__ import annotations

import torch


def reference_logits(hidden, weight, bias=None, logit_scale=1.0, softcap=None):
    """``softcap * tanh(logit_scale * (h W^T + b) / softcap)`` (or without the cap) in float64."""
    z = hidden.double() @ weight.double().t()
    if bias is not None:
        z = z + bias.double()
    z = z * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z


def reference_token_logprobs(hidden, weight, labels, bias=None, logit_scale=1.0, softcap=None,
                             ignore_index=-100):
    """Per-token log p(labels) with shape ``labels.shape``; 0 where ``labels == ignore_index``."""
    logp_all = torch.log_softmax(reference_logits(hidden, weight, bias, logit_scale, softcap), dim=-1)
    keep = labels != ignore_index
    safe = torch.where(keep, labels, torch.zeros_like(labels))
    logp = logp_all.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return torch.where(keep, logp, torch.zeros_like(logp))


def reference_sequence_logprobs(hidden, weight, labels, bias=None, logit_scale=1.0, softcap=None,
                                ignore_index=-100):
    """Padded input ``hidden [R, T, D]``, ``labels [R, T]`` -> (sums [R] float64, counts [R] int64)."""
    logp = reference_token_logprobs(hidden, weight, labels, bias, logit_scale, softcap, ignore_index)
    return logp.sum(-1), (labels != ignore_index).sum(-1)


def reference_sequence_logprobs_packed(hidden, weight, labels, cu_seqlens, bias=None, logit_scale=1.0,
                                       softcap=None, ignore_index=-100):
    """Packed input ``hidden [N, D]``, ``labels [N]``, ``cu_seqlens [R+1]`` -> (sums [R], counts [R])."""
    logp = reference_token_logprobs(hidden, weight, labels, bias, logit_scale, softcap, ignore_index)
    keep = labels != ignore_index
    bounds = cu_seqlens.tolist()
    sums = torch.stack([logp[a:b].sum() for a, b in zip(bounds[:-1], bounds[1:])])
    counts = torch.stack([keep[a:b].sum() for a, b in zip(bounds[:-1], bounds[1:])])
    return sums, counts


def reference_stats_from_logits(logits, labels, ignore_index=-100):
    """TRL's per-token statistics of given logits ``[..., V]`` in float64 (``token_stats.py``):
    ``{name: labels.shape}``, 0 where ``labels == ignore_index``; is_top1 ties go to the first index."""
    z = logits.double()
    logp_all = torch.log_softmax(z, dim=-1)
    prob = logp_all.exp()
    vocab = z.shape[-1]
    first_max = torch.where(z == z.amax(-1, keepdim=True), torch.arange(vocab, device=z.device), vocab).amin(-1)
    values = {
        "entropy": -(prob * torch.where(prob > 0, logp_all, torch.zeros_like(logp_all))).sum(-1),
        "log_sum_sq_probs": torch.logsumexp(2 * logp_all, dim=-1),
        "mean_logits": z.mean(-1),
        "is_top1": (first_max == labels).double(),
    }
    keep = labels != ignore_index
    return {name: torch.where(keep, v, torch.zeros_like(v)) for name, v in values.items()}


def reference_token_stats(hidden, weight, labels, bias=None, logit_scale=1.0, softcap=None, ignore_index=-100):
    """The statistics of ``reference_stats_from_logits`` for the logits of ``reference_logits``."""
    return reference_stats_from_logits(reference_logits(hidden, weight, bias, logit_scale, softcap), labels,
                                       ignore_index)
