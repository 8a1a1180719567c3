"""Triton forward epilogue: per-row logsumexp statistics of one cuBLAS logit tile.

The cuBLAS forward (``UPO_FWD_IMPL=cublas``) computes ``z = H_g W_c^T`` tiles with cuBLAS
(fp32 output) and this kernel reduces each tile to three fp32 numbers per row: the max and
the sum of ``exp(x - max)`` over the tile's columns, and the target logit when the label falls
in the tile, where ``x = cap(logit_scale * (z + b))`` is the logit the model sees (and, when
asked, the token statistics' partials of ``token_stats.py``). The host merges the tiles'
numbers exactly as it merges the fused kernel's vocabulary splits.
"""
from __future__ import annotations

import triton
import triton.language as tl

from upo_kernels.tile_math import (capped_logits, online_init, online_logsumexp_stats, row_block, stats_init,
                                   store_parts, store_stats)


@triton.jit
def logsumexp_tile_kernel(
    Z,                                # [N, VC] raw logits h . W_c^T (fp32)
    BIAS, Y,                          # bias [V] (full), labels [N] int64 (global vocabulary ids)
    PART_MAX, PART_SUM, PART_TGT,     # [N, num_tiles] fp32; this tile writes column `tile`
    PART_STATS, stat_stride,          # [4, N, num_tiles] fp32 token-statistic partials (when requested)
    N, VC, v_offset, stride_zn, num_tiles, tile,
    logit_scale, softcap,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
    HAS_ENTROPY: tl.constexpr, HAS_SUM_SQ: tl.constexpr, HAS_MEAN: tl.constexpr, HAS_TOP1: tl.constexpr,
):
    offs_n, row_ok, rows = row_block(N, BLOCK_N)
    local_label = tl.load(Y + offs_n, mask=row_ok, other=-1) - v_offset
    run_max, run_sum, target = online_init(BLOCK_N)
    ent, sq, zsum, before = stats_init(BLOCK_N)
    for v0 in range(0, VC, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        col_ok = offs_v < VC
        z = tl.load(Z + rows * stride_zn + offs_v[None, :], mask=row_ok[:, None] & col_ok[None, :],
                    other=0.0).to(tl.float32)
        x, _ = capped_logits(z, BIAS, v_offset + offs_v, col_ok, logit_scale, softcap, HAS_BIAS, HAS_SOFTCAP)
        run_max, run_sum, target, ent, sq, zsum, before = online_logsumexp_stats(
            x, offs_v, col_ok, local_label, run_max, run_sum, target, ent, sq, zsum, before,
            HAS_ENTROPY, HAS_SUM_SQ, HAS_MEAN, HAS_TOP1)
    store_parts(PART_MAX, PART_SUM, PART_TGT, offs_n, row_ok, num_tiles, tile, run_max, run_sum, target)
    store_stats(PART_STATS, stat_stride, offs_n, row_ok, num_tiles, tile, ent, sq, zsum, before,
                HAS_ENTROPY, HAS_SUM_SQ, HAS_MEAN, HAS_TOP1)
