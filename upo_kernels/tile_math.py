"""Triton device functions shared by the kernels: the logit transform, the online logsumexp and
the token statistics folded in with it.

Kept in one place so that the forward kernels and the backward epilogue see the very same
``x = cap(logit_scale * (z + b))`` and the same running (max, sum-exp, target) update.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def tanh(x):
    # tanh through sigmoid: portable across Triton versions (no libdevice import needed)
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def row_block(N, BLOCK_N: tl.constexpr):
    """This program's rows (1-D grid over row blocks): ids, in-range mask, int64 column of ids."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    return offs_n, offs_n < N, offs_n.to(tl.int64)[:, None]


@triton.jit
def capped_logits(z, BIAS, offs_bias, col_ok, logit_scale, softcap,
                  HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """Raw fp32 logit tile ``z`` [BN, BV] -> (``x = cap(logit_scale * (z + b))``, ``t``), where
    ``t = tanh(.)`` of the soft cap (the backward's ``1 - t^2``); ``t = x`` without a cap."""
    if HAS_BIAS:
        z += tl.load(BIAS + offs_bias, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    x = z * logit_scale
    t = x
    if HAS_SOFTCAP:
        t = tanh(x / softcap)
        x = softcap * t
    return x, t


@triton.jit
def online_init(BLOCK_N: tl.constexpr):
    """Empty running state per row: (max = -inf, sum-exp = 0, target logit = 0)."""
    return (tl.full((BLOCK_N,), float("-inf"), tl.float32), tl.zeros((BLOCK_N,), tl.float32),
            tl.zeros((BLOCK_N,), tl.float32))


@triton.jit
def online_step(x, offs_v, col_ok, labels, run_max, run_sum, target):
    """One online-logsumexp step over a logit tile ``x`` [BN, BV] (columns ``offs_v``, valid where
    ``col_ok``): -> (masked ``x``, ``e = exp(x - new_max)``, ``scale = exp(run_max - new_max)``,
    new max, new sum of ``exp(x - max)``, target logit of each row's label).

    ``col_ok`` matters for the target too: a tile's masked overhang can carry the ids of columns
    that belong to the next split or chunk."""
    x = tl.where(col_ok[None, :], x, float("-inf"))
    is_target = (offs_v[None, :] == labels[:, None]) & col_ok[None, :]
    target += tl.sum(tl.where(is_target, x, 0.0), axis=1)
    new_max = tl.maximum(run_max, tl.max(x, axis=1))
    new_max = tl.where(new_max == float("-inf"), 0.0, new_max)  # fully masked rows stay finite
    scale = tl.exp(run_max - new_max)
    e = tl.exp(x - new_max[:, None])
    run_sum = run_sum * scale + tl.sum(e, axis=1)
    return x, e, scale, new_max, run_sum, target


@triton.jit
def online_logsumexp(x, offs_v, col_ok, labels, run_max, run_sum, target):
    """Fold a logit tile into the running per-row max, sum of ``exp(x - max)`` and label logit."""
    _, _, _, run_max, run_sum, target = online_step(x, offs_v, col_ok, labels, run_max, run_sum, target)
    return run_max, run_sum, target


@triton.jit
def stats_init(BLOCK_N: tl.constexpr):
    """Empty token statistics per row (``token_stats.py``): u = sum e (x - max), q = sum e^2,
    sum x, max logit left of the label."""
    return (tl.zeros((BLOCK_N,), tl.float32), tl.zeros((BLOCK_N,), tl.float32),
            tl.zeros((BLOCK_N,), tl.float32), tl.full((BLOCK_N,), float("-inf"), tl.float32))


@triton.jit
def online_logsumexp_stats(x, offs_v, col_ok, labels, run_max, run_sum, target, ent, sq, zsum, before,
                           HAS_ENTROPY: tl.constexpr, HAS_SUM_SQ: tl.constexpr, HAS_MEAN: tl.constexpr,
                           HAS_TOP1: tl.constexpr):
    """``online_logsumexp`` plus the requested token statistics, from the same ``exp`` tile. With
    every flag off it is ``online_logsumexp``: the statistics pass through untouched."""
    old_max, old_sum = run_max, run_sum
    x, e, scale, run_max, run_sum, target = online_step(x, offs_v, col_ok, labels, run_max, run_sum, target)
    if HAS_ENTROPY:
        # the old sum of e (x - old_max) re-expressed at the new max; e = 0 terms (masked or -inf
        # logits) add exactly 0
        shift = tl.where(old_sum > 0, old_max - run_max, 0.0)
        tile_u = tl.sum(e * tl.where(e > 0, x - run_max[:, None], 0.0), axis=1)
        ent = scale * (ent + shift * old_sum) + tile_u
    if HAS_SUM_SQ:
        sq = sq * scale * scale + tl.sum(e * e, axis=1)
    if HAS_MEAN:
        zsum += tl.sum(tl.where(col_ok[None, :], x, 0.0), axis=1)
    if HAS_TOP1:
        left = offs_v[None, :] < labels[:, None]  # x is -inf on masked columns already
        before = tl.maximum(before, tl.max(tl.where(left, x, float("-inf")), axis=1))
    return run_max, run_sum, target, ent, sq, zsum, before


@triton.jit
def store_parts(PART_MAX, PART_SUM, PART_TGT, offs_n, row_ok, num_parts, part, run_max, run_sum, target):
    """Write one slice's (max, sum-exp, target) into column ``part`` of the [N, num_parts] buffers."""
    out = offs_n.to(tl.int64) * num_parts + part
    tl.store(PART_MAX + out, run_max, mask=row_ok)
    tl.store(PART_SUM + out, run_sum, mask=row_ok)
    tl.store(PART_TGT + out, target, mask=row_ok)


@triton.jit
def store_stats(PARTS, stat_stride, offs_n, row_ok, num_parts, part, ent, sq, zsum, before,
                HAS_ENTROPY: tl.constexpr, HAS_SUM_SQ: tl.constexpr, HAS_MEAN: tl.constexpr,
                HAS_TOP1: tl.constexpr):
    """Write the requested statistics into column ``part`` of ``PARTS`` [4, N, num_parts] (rows in
    ``token_stats.STATS`` order, ``stat_stride`` apart)."""
    out = offs_n.to(tl.int64) * num_parts + part
    if HAS_ENTROPY:
        tl.store(PARTS + out, ent, mask=row_ok)
    if HAS_SUM_SQ:
        tl.store(PARTS + stat_stride + out, sq, mask=row_ok)
    if HAS_MEAN:
        tl.store(PARTS + 2 * stat_stride + out, zsum, mask=row_ok)
    if HAS_TOP1:
        tl.store(PARTS + 3 * stat_stride + out, before, mask=row_ok)
