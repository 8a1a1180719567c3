"""``upo.fused_loss``: hidden states + LM head -> per-sequence log-probs -> any ``upo.loss``.

The logits never exist: the flattened hidden states and labels go to
``upo_kernels.linear_logprobs``, which runs only the response tokens (labels != ignore_index)
through the kernels; their per-token log-probs are summed per sequence
with ``index_add`` (O(tokens)). Reference log-probs come precomputed or from reference hidden
states through the same kernel without grad. What a loss needs per token (LD-DPO's shared
prefix, WPO's weights) and TRL's token metrics are built from the same per-token values
(``sequence_features.py``).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from upo import sequence_features as features
from upo.losses import loss
from upo_kernels import linear_logprobs
from upo_kernels.context_parallel import sum_over_ranks
from upo_kernels.nonfinite import NonFiniteError, nonfinite_inputs
from upo_kernels.token_stats import check_stats


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


class _Tokens(NamedTuple):
    """Per-token values of a flattened batch (``sequence_features.py`` for the conventions)."""

    hidden: torch.Tensor   # [N, D] the flattened hidden states
    logp: torch.Tensor     # [N], 0 where ignored, differentiable
    stats: dict            # {name: [N]} token statistics, no gradient
    keep: torch.Tensor     # [N] labels != ignore_index
    seq_ids: torch.Tensor  # [N]
    counts: torch.Tensor   # [R] labelled tokens per sequence
    rows: int


def _token_logprobs(hidden, weight, labels, cu_seqlens, bias, logit_scale, softcap, ignore_index, backend,
                    allow_empty=False, stats=(), process_group=None, vocab_offset=None, split=False):
    """``split`` (context parallelism): another rank may hold a sequence's tokens, so a sequence may have none
    here, and non-finite log-probs are found after the sums over the ranks (``_checked_sums``), on every rank."""
    flat_h, flat_y, seq_ids, rows = _flatten(hidden, labels, cu_seqlens, weight)
    if flat_y.dtype.is_floating_point or flat_y.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {flat_y.dtype}")
    keep = flat_y != ignore_index
    # response tokens per sequence; linear_logprobs finds the rows to run itself
    counts = torch.zeros(rows, dtype=torch.int64, device=flat_y.device).index_add_(0, seq_ids, keep.to(torch.int64))
    if not (allow_empty or split) and rows:
        _check_every_row_has_tokens(counts, ignore_index)
    # all rows go in: the kernels skip the ignored ones (no gathered copy outlives the forward)
    out = linear_logprobs(flat_h, weight, flat_y, bias=bias, logit_scale=logit_scale, softcap=softcap,
                          ignore_index=ignore_index, backend=backend, stats=stats, process_group=process_group,
                          vocab_offset=vocab_offset, check_finite=not split)
    logp, values = (out.logp, out.stats) if stats else (out, {})
    return _Tokens(flat_h, logp, values, keep, seq_ids, counts, rows)


def _checked_sums(tokens, weight, bias, sequence_group=None):
    """Per-sequence sums of the log-probs; with ``sequence_group``, summed over its ranks first, so that every
    rank raises alike (a rank that raised alone would leave the others waiting in a collective). Without it
    ``linear_logprobs`` has checked every log-prob; this sees a sum that overflows."""
    sums = features.per_sequence_sum(tokens.logp, tokens.seq_ids, tokens.rows)
    if sequence_group is not None:
        sums = sum_over_ranks(sums, sequence_group)
    if not bool(torch.isfinite(sums).all()):
        raise NonFiniteError(nonfinite_inputs(tokens.hidden[tokens.keep], weight, bias))
    return sums


def sequence_logprobs(hidden, weight, labels, *, cu_seqlens=None, bias=None, logit_scale=1.0,
                      softcap=None, ignore_index=-100, backend="auto", allow_empty=False, stats=(),
                      process_group=None, vocab_offset=None):
    """Summed response log-probs per sequence, straight from hidden states.

    hidden [R, T, D] with labels [R, T], or packed hidden [N, D] with labels [N] and
    ``cu_seqlens`` [R+1]. Returns (sums [R] fp32, counts [R] int64). A sequence without
    response tokens is an error naming its row unless ``allow_empty``. ``stats``: token
    statistics (``upo_kernels.TOKEN_STATS``) from the same pass; with any, a third element
    ``{name: [R]}`` holds their sums over each sequence's response tokens (divide by ``counts``
    for means), without gradient. A head sharded over the vocabulary (a ``Shard(0)`` DTensor
    ``weight``, or ``process_group`` + ``vocab_offset``): as ``upo_kernels.linear_logprobs``.
    """
    stats = check_stats(stats)
    tokens = _token_logprobs(hidden, weight, labels, cu_seqlens, bias, logit_scale, softcap, ignore_index, backend,
                             allow_empty, stats, process_group, vocab_offset)
    sums = _checked_sums(tokens, weight, bias)
    if not stats:
        return sums, tokens.counts
    stat_sums = {name: features.per_sequence_sum(v, tokens.seq_ids, tokens.rows) for name, v in tokens.stats.items()}
    return sums, tokens.counts, stat_sums


def fused_loss(hidden, weight, labels, *, bias=None, cu_seqlens=None, ref_chosen_logps=None,
               ref_rejected_logps=None, ref_hidden=None, ref_weight=None, ref_bias=None,
               ref_chosen_shared_logps=None, ref_rejected_shared_logps=None, logit_scale=1.0, softcap=None,
               ignore_index=-100, backend="auto", token_stats=False, process_group=None, vocab_offset=None,
               sequence_group=None, **loss_kwargs):
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
        ref_chosen_shared_logps, ref_rejected_shared_logps: with precomputed reference sums and
            ``ld_alpha``, the reference's sums over the shared prefix ``[B]`` (below); computed
            from ``ref_hidden`` otherwise.
        logit_scale, softcap: logits are ``softcap * tanh(logit_scale * (h W^T + b) / softcap)``.
        backend: ``"triton"`` | ``"torch"`` | ``"auto"`` (triton on CUDA, torch elsewhere).
        process_group, vocab_offset: an LM head sharded over the vocabulary by hand (``weight``,
            ``bias`` and ``ref_weight``/``ref_bias`` are this rank's rows); a ``Shard(0)`` DTensor
            weight needs neither. Every rank gets the same loss (``docs/tensor_parallel.md``).
        sequence_group: the sequences' tokens split over this process group's ranks (context parallelism,
            ``upo/context_parallel.py``): each rank passes its own tokens of every sequence (a sequence may have
            none on a rank); the per-sequence sums, token counts and token statistics are summed over the group
            once, every rank gets the same loss, and the parameters' gradients summed over the group are one
            process's. Not with ``ld_alpha`` or ``use_weighting``, whose token order spans the ranks.
        token_stats: also compute TRL's token statistics in the same pass and add its logged
            metrics to ``metrics``: ``entropy``, ``mean_token_accuracy``, ``logits/chosen``,
            ``logits/rejected`` (``sequence_features.token_metrics``).
        **loss_kwargs: everything ``upo.loss`` takes (loss_type, loss_weights, beta,
            label_smoothing, aux rewards, values, per-loss options). Lengths come from labels.
            With ``use_weighting=True`` (WPO) ``upo.loss`` also gets ``chosen_wpo_weights`` /
            ``rejected_wpo_weights`` (detached ``[B]``); with ``ld_alpha`` (LD-DPO)
            ``chosen_shared_logps`` / ``rejected_shared_logps`` (with grad) and the reference's
            ``ref_chosen_shared_logps`` / ``ref_rejected_shared_logps``: sums over each pair's
            first ``min(n_c, n_r)`` response tokens.

    Returns the ``upo.loss`` output (``loss``, ``losses``, ``terms``, ``metrics``).
    """
    for name in ("chosen_lengths", "rejected_lengths"):
        if name in loss_kwargs:
            raise ValueError(f"{name} is computed from labels by fused_loss; do not pass it")
    use_wpo = bool(loss_kwargs.get("use_weighting"))
    use_ld = loss_kwargs.get("ld_alpha") is not None
    if sequence_group is not None and (use_wpo or use_ld):
        raise ValueError(f"{'use_weighting' if use_wpo else 'ld_alpha'} is not supported with sequence_group "
                         "(context parallelism): its per-token weights depend on tokens other ranks hold")
    split = sequence_group is not None
    ref_shared = _check_ref_shared(use_ld, ref_hidden, ref_chosen_logps, ref_chosen_shared_logps,
                                   ref_rejected_shared_logps)
    stats = (("entropy", "mean_logits", "is_top1") if token_stats else ()) + (("log_sum_sq_probs",) if use_wpo else ())
    kernel_args = dict(cu_seqlens=cu_seqlens, logit_scale=logit_scale, softcap=softcap,
                       ignore_index=ignore_index, backend=backend, process_group=process_group,
                       vocab_offset=vocab_offset)
    tokens = _token_logprobs(hidden, weight, labels, bias=bias, stats=check_stats(stats), split=split, **kernel_args)
    sums, counts, rows = _checked_sums(tokens, weight, bias, sequence_group), tokens.counts, tokens.rows
    if split:
        counts = sum_over_ranks(counts, sequence_group)
        _check_every_row_has_tokens(counts, ignore_index)
    if rows % 2:
        raise ValueError(f"hidden must hold 2B rows (B chosen then B rejected), got {rows} sequences")
    half = rows // 2
    extra = {}
    shared = features.shared_prefix(tokens.keep, tokens.seq_ids, counts) if use_ld else None
    if use_ld:
        policy_shared = features.shared_sums(tokens.logp, shared, tokens.seq_ids, rows)
        extra.update(chosen_shared_logps=policy_shared[:half], rejected_shared_logps=policy_shared[half:])
    if use_wpo:
        weights = features.wpo_weights(tokens.logp, tokens.stats["log_sum_sq_probs"], tokens.keep, tokens.seq_ids,
                                       counts)
        extra.update(chosen_wpo_weights=weights[:half], rejected_wpo_weights=weights[half:])
    if ref_hidden is not None:
        if ref_chosen_logps is not None or ref_rejected_logps is not None:
            raise ValueError("pass either ref_hidden or ref_chosen_logps/ref_rejected_logps, not both")
        if not isinstance(ref_hidden, torch.Tensor) or ref_hidden.shape != hidden.shape:
            got = tuple(ref_hidden.shape) if isinstance(ref_hidden, torch.Tensor) else type(ref_hidden).__name__
            raise ValueError(f"ref_hidden must have hidden's shape {tuple(hidden.shape)}, got {got}")
        # a NaN or inf in the reference pass is named by the caller's argument (ref_hidden, not hidden)
        names = {"hidden": "ref_hidden", "weight": "ref_weight", "bias": "ref_bias"}
        if ref_weight is None:  # same LM head: the policy's weight and bias
            ref_weight, ref_bias = weight, bias if ref_bias is None else ref_bias
            names.update(weight="weight", bias="bias" if ref_bias is bias else "ref_bias")
        with torch.no_grad():
            try:
                ref_tokens = _token_logprobs(ref_hidden.detach(), ref_weight.detach(), labels,
                                             bias=None if ref_bias is None else ref_bias.detach(), split=split,
                                             **kernel_args)
                ref_sums = _checked_sums(ref_tokens, ref_weight, ref_bias, sequence_group)
            except NonFiniteError as err:
                raise err.renamed(names) from None
            if use_ld:
                ref_shared = features.shared_sums(ref_tokens.logp, shared, ref_tokens.seq_ids, rows)
                ref_shared = (ref_shared[:half], ref_shared[half:])
        ref_chosen_logps, ref_rejected_logps = ref_sums[:half], ref_sums[half:]
    elif ref_weight is not None or ref_bias is not None:
        raise ValueError("ref_weight/ref_bias need ref_hidden")
    if use_ld and ref_shared is not None:
        extra.update(ref_chosen_shared_logps=ref_shared[0], ref_rejected_shared_logps=ref_shared[1])
    out = loss(sums[:half], sums[half:], ref_chosen_logps, ref_rejected_logps,
               chosen_lengths=counts[:half], rejected_lengths=counts[half:], **extra, **loss_kwargs)
    if token_stats:
        stat_sums = features.stat_sums64(tokens.stats, tokens.seq_ids, rows)
        if split:
            stat_sums = {name: sum_over_ranks(v, sequence_group) for name, v in stat_sums.items()}
        out.metrics.update(features.token_metrics_of_sums(stat_sums, counts))
    return out


def _check_every_row_has_tokens(counts, ignore_index):
    if bool((counts == 0).any()):
        row = int((counts == 0).nonzero()[0])
        raise ValueError(f"labels: {_describe_row(row, counts.shape[0])} has no response tokens "
                         f"(every label is ignore_index={ignore_index})")


def _check_ref_shared(use_ld, ref_hidden, ref_chosen_logps, chosen_shared, rejected_shared):
    """The precomputed reference shared-prefix sums LD-DPO needs: ``(chosen, rejected)`` or None."""
    given = [x is not None for x in (chosen_shared, rejected_shared)]
    if any(given) and not use_ld:
        raise ValueError("ref_chosen_shared_logps/ref_rejected_shared_logps are for ld_alpha (LD-DPO) only")
    if any(given) and ref_hidden is not None:
        raise ValueError("pass either ref_hidden or ref_chosen_shared_logps/ref_rejected_shared_logps, not both")
    if any(given) and not all(given):
        missing = "ref_chosen_shared_logps" if chosen_shared is None else "ref_rejected_shared_logps"
        raise ValueError(f"{missing} is missing: give the reference's shared sums for both chosen and rejected")
    if use_ld and ref_chosen_logps is not None and not all(given):
        raise ValueError("ld_alpha with precomputed reference sums needs ref_chosen_shared_logps and "
                         "ref_rejected_shared_logps (the reference's sums over each pair's first "
                         "min(n_chosen, n_rejected) response tokens)")
    return (chosen_shared, rejected_shared) if all(given) else None
