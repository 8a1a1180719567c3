"""Triton forward: ``h . W^T`` tiles -> online logsumexp + target logit, never writing logits.

Grid ``(vocab_splits, token_blocks)``. Each program owns ``BLOCK_N`` tokens and one slice of
the vocabulary; it walks that slice in ``BLOCK_V`` tiles, accumulating each logit tile over
``D`` in fp32 with ``tl.dot``, then folds it into a running (max, sum-exp) pair and picks out
the target logit when the label falls in the tile. It writes three fp32 numbers per token and
split (and, when asked, the token statistics' partials of ``token_stats.py``, folded in from
the same ``exp`` tile; every ``HAS_*`` flag off compiles to the kernel without them); the host
merges the splits (``O(tokens x splits)``).

Why split the vocabulary: the split index is the fastest grid axis, so the programs that run
at the same time cover a few token blocks times many vocabulary slices. Their working set
(a few hidden-state panels plus one weight tile per slice) stays in L2, where a grid over
token blocks alone would stream every hidden panel from HBM once per vocabulary tile.
"""
from __future__ import annotations

import triton
import triton.language as tl

from upo_kernels.tile_math import (capped_logits, online_init, online_logsumexp_stats, stats_init, store_parts,
                                   store_stats)


@triton.jit
def linear_logprobs_fwd_kernel(
    H, W, BIAS, Y,                   # hidden [N, D], weight [V, D], bias [V], labels [N] (int64)
    PART_MAX, PART_SUM, PART_TGT,    # [N, SPLITS] fp32 partial results
    PART_STATS, stat_stride,         # [4, N, SPLITS] fp32 token-statistic partials (when requested)
    N, V, D,
    stride_hn, stride_wv,
    vocab_per_split, num_splits,
    logit_scale, softcap,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, ROUND_LOGITS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_ENTROPY: tl.constexpr, HAS_SUM_SQ: tl.constexpr, HAS_MEAN: tl.constexpr, HAS_TOP1: tl.constexpr,
):
    split = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_n < N
    labels = tl.load(Y + offs_n, mask=row_ok, other=-1)
    offs_d = tl.arange(0, BLOCK_D)
    h_rows = H + offs_n.to(tl.int64)[:, None] * stride_hn

    v_begin = split * vocab_per_split
    v_end = tl.minimum(v_begin + vocab_per_split, V)
    run_max, run_sum, target = online_init(BLOCK_N)
    ent, sq, zsum, before = stats_init(BLOCK_N)
    for v0 in range(v_begin, v_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        col_ok = offs_v < v_end
        w_rows = W + offs_v.to(tl.int64)[:, None] * stride_wv
        acc = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d_ok = (d0 + offs_d) < D
            h = tl.load(h_rows + (d0 + offs_d)[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            w = tl.load(w_rows + (d0 + offs_d)[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            acc = tl.dot(h, tl.trans(w), acc, input_precision=DOT_PRECISION)
        if ROUND_LOGITS:  # as cuBLAS writes a 16-bit product (the backward recomputes it so)
            acc = acc.to(H.dtype.element_ty).to(tl.float32)
        x, _ = capped_logits(acc, BIAS, offs_v, col_ok, logit_scale, softcap, HAS_BIAS, HAS_SOFTCAP)
        # col_ok (v_end): the last tile of a split overhangs into the next split's columns
        run_max, run_sum, target, ent, sq, zsum, before = online_logsumexp_stats(
            x, offs_v, col_ok, labels, run_max, run_sum, target, ent, sq, zsum, before,
            HAS_ENTROPY, HAS_SUM_SQ, HAS_MEAN, HAS_TOP1)
    store_parts(PART_MAX, PART_SUM, PART_TGT, offs_n, row_ok, num_splits, split, run_max, run_sum, target)
    store_stats(PART_STATS, stat_stride, offs_n, row_ok, num_splits, split, ent, sq, zsum, before,
                HAS_ENTROPY, HAS_SUM_SQ, HAS_MEAN, HAS_TOP1)
