"""``upo.fused_loss``: hidden states + LM head -> per-sequence log-probs -> any ``upo.loss``.

The logits never exist: the flattened hidden states and labels go to
``upo_kernels.linear_logprobs``, which runs only the response tokens (labels != ignore_index)
through the kernels; their per-token log-probs are summed per sequence
with ``index_add`` (O(tokens)). Reference log-probs come precomputed or from reference hidden
states through the same kernel without grad.
"""
from __future__ import annotations

import torch

from upo.losses import loss
from upo_kernels import linear_logprobs


def _check_cu_seqlens(cu_seqlens, n_tokens):
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError("cu_seqlens must be an int32/int64 tensor of sequence offsets")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D with at least 2 entries, got shape {tuple(cu_seqlens.shape)}")
    offsets = cu_seqlens.to(torch.int64)
    if int(offsets[0]) != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {int(offsets[0])}")
    if bool((offsets[1:] < offsets[:-1]).any()):
        raise ValueError("cu_seqlens must be non-decreasing")
    if int(offsets[-1]) != n_tokens:
        raise ValueError(f"cu_seqlens must end at the number of tokens ({n_tokens}), got {int(offsets[-1])}")
    return offsets


def _flatten(hidden, labels, cu_seqlens, weight):
    """-> (hidden [N, D], labels [N], sequence id per token [N], number of sequences R)."""
    if not isinstance(hidden, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise TypeError("hidden and labels must be torch.Tensors")
    for name, t in (("weight", weight), ("labels", labels)):
        if isinstance(t, torch.Tensor) and t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but hidden is on {hidden.device}")
    if cu_seqlens is None:
        if hidden.dim() != 3:
            raise ValueError(
                f"hidden must be [2B, T, D] (or [N, D] with cu_seqlens), got shape {tuple(hidden.shape)}")
        if tuple(labels.shape) != tuple(hidden.shape[:2]):
            raise ValueError(f"labels shape {tuple(labels.shape)} must be [2B, T] = {tuple(hidden.shape[:2])}")
        rows, length = labels.shape
        seq_ids = torch.arange(rows, device=hidden.device).repeat_interleave(length)
        return hidden.reshape(rows * length, hidden.shape[-1]), labels.reshape(-1), seq_ids, rows
    if hidden.dim() != 2:
        raise ValueError(f"with cu_seqlens, hidden must be packed [N, D], got shape {tuple(hidden.shape)}")
    if tuple(labels.shape) != (hidden.shape[0],):
        raise ValueError(f"with cu_seqlens, labels must be [N] = [{hidden.shape[0]}], got {tuple(labels.shape)}")
    offsets = _check_cu_seqlens(cu_seqlens, hidden.shape[0]).to(hidden.device)
    rows = offsets.numel() - 1
    if rows % 2:
        raise ValueError(f"cu_seqlens must describe 2B sequences (B chosen then B rejected), got {rows}")
    seq_ids = torch.arange(rows, device=hidden.device).repeat_interleave(offsets[1:] - offsets[:-1])
    return hidden, labels, seq_ids, rows


def _describe_row(row, rows):
    half = rows // 2
    side = "chosen" if row < half else "rejected"
    return f"row {row} ({side} response of pair {row % half})" if half else f"row {row}"


def sequence_logprobs(hidden, weight, labels, *, cu_seqlens=None, bias=None, logit_scale=1.0,
                      softcap=None, ignore_index=-100, backend="auto", allow_empty=False):
    """Summed response log-probs per sequence, straight from hidden states.

    hidden [R, T, D] with labels [R, T], or packed hidden [N, D] with labels [N] and
    ``cu_seqlens`` [R+1]. Returns (sums [R] fp32, counts [R] int64). A sequence without
    response tokens is an error naming its row unless ``allow_empty``.
    """
    flat_h, flat_y, seq_ids, rows = _flatten(hidden, labels, cu_seqlens, weight)
    if flat_y.dtype.is_floating_point or flat_y.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {flat_y.dtype}")
    # response tokens per sequence; linear_logprobs finds the rows to run itself
    counts = torch.zeros(rows, dtype=torch.int64, device=flat_y.device).index_add_(
        0, seq_ids, (flat_y != ignore_index).to(torch.int64))
    if not allow_empty and rows and bool((counts == 0).any()):
        row = int((counts == 0).nonzero()[0])
        raise ValueError(f"labels: {_describe_row(row, rows)} has no response tokens "
                         f"(every label is ignore_index={ignore_index})")
    # all rows go in: the kernels skip the ignored ones (no gathered copy outlives the forward)
    logp = linear_logprobs(flat_h, weight, flat_y, bias=bias, logit_scale=logit_scale, softcap=softcap,
                           ignore_index=ignore_index, backend=backend)
    # float64 accumulation: summing thousands of fp32 log-probs one by one loses ~1e-2 absolute
    sums = torch.zeros(rows, dtype=torch.float64, device=logp.device).index_add(0, seq_ids, logp.double())
    sums = sums.to(logp.dtype)
    if not bool(torch.isfinite(sums).all()):
        culprits = [name for name, t in (("hidden", hidden), ("weight", weight), ("bias", bias))
                    if t is not None and not bool(torch.isfinite(t).all())]
        raise ValueError(f"non-finite log-probs: {', '.join(culprits) or 'hidden/weight'} "
                         "contain NaN or inf")
    return sums, counts


def fused_loss(hidden, weight, labels, *, bias=None, cu_seqlens=None, ref_chosen_logps=None,
               ref_rejected_logps=None, ref_hidden=None, ref_weight=None, ref_bias=None,
               logit_scale=1.0, softcap=None, ignore_index=-100, backend="auto", **loss_kwargs):
    """Preference loss straight from final hidden states and the LM-head weight.

    Args:
        hidden: ``[2B, T, D]`` final hidden states, B chosen rows then B rejected rows; or
            packed ``[N, D]`` with ``cu_seqlens``.
        weight: ``[V, D]`` LM-head weight (``bias``: optional ``[V]``).
        labels: ``[2B, T]`` (or ``[N]``) targets aligned with hidden: row t predicts
            ``labels[t]``; ``ignore_index`` marks prompt and padding tokens.
        cu_seqlens: int32 ``[2B+1]`` offsets of packed sequences, chosen first.
        ref_chosen_logps, ref_rejected_logps: precomputed reference sums ``[B]``; or
        ref_hidden (same layout as hidden), ref_weight and ref_bias (default: the policy's
            ``weight`` and ``bias``): the
            reference model's states, used without grad.
        logit_scale, softcap: logits are ``softcap * tanh(logit_scale * (h W^T + b) / softcap)``.
        backend: ``"triton"`` | ``"torch"`` | ``"auto"`` (triton on CUDA, torch elsewhere).
        **loss_kwargs: everything ``upo.loss`` takes (loss_type, loss_weights, beta,
            label_smoothing, aux rewards, values, per-loss options). Lengths come from labels.

    Returns the ``upo.loss`` output (``loss``, ``losses``, ``terms``, ``metrics``).
    """
    for name in ("chosen_lengths", "rejected_lengths"):
        if name in loss_kwargs:
            raise ValueError(f"{name} is computed from labels by fused_loss; do not pass it")
    kernel_args = dict(cu_seqlens=cu_seqlens, logit_scale=logit_scale, softcap=softcap,
                       ignore_index=ignore_index, backend=backend)
    sums, counts = sequence_logprobs(hidden, weight, labels, bias=bias, **kernel_args)
    rows = sums.shape[0]
    if rows % 2:
        raise ValueError(f"hidden must hold 2B rows (B chosen then B rejected), got {rows} sequences")
    half = rows // 2
    if ref_hidden is not None:
        if ref_chosen_logps is not None or ref_rejected_logps is not None:
            raise ValueError("pass either ref_hidden or ref_chosen_logps/ref_rejected_logps, not both")
        if not isinstance(ref_hidden, torch.Tensor) or ref_hidden.shape != hidden.shape:
            got = tuple(ref_hidden.shape) if isinstance(ref_hidden, torch.Tensor) else type(ref_hidden).__name__
            raise ValueError(f"ref_hidden must have hidden's shape {tuple(hidden.shape)}, got {got}")
        if ref_weight is None:  # same LM head: the policy's weight and bias
            ref_weight, ref_bias = weight, bias if ref_bias is None else ref_bias
        with torch.no_grad():
            ref_sums, _ = sequence_logprobs(ref_hidden.detach(), ref_weight.detach(), labels,
                                            bias=None if ref_bias is None else ref_bias.detach(),
                                            **kernel_args)
        ref_chosen_logps, ref_rejected_logps = ref_sums[:half], ref_sums[half:]
    elif ref_weight is not None or ref_bias is not None:
        raise ValueError("ref_weight/ref_bias need ref_hidden")
    return loss(sums[:half], sums[half:], ref_chosen_logps, ref_rejected_logps,
                chosen_lengths=counts[:half], rejected_lengths=counts[half:], **loss_kwargs)
