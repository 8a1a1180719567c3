"""Triton device functions shared by the kernels: the logit transform and the online logsumexp.

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
def online_logsumexp(x, offs_v, col_ok, labels, run_max, run_sum, target):
    """Fold a logit tile ``x`` [BN, BV] (columns ``offs_v``, valid where ``col_ok``) into the
    running per-row max, sum of ``exp(x - max)`` and the logit of each row's label.

    ``col_ok`` matters for the target too: a tile's masked overhang can carry the ids of columns
    that belong to the next split or chunk."""
    x = tl.where(col_ok[None, :], x, float("-inf"))
    is_target = (offs_v[None, :] == labels[:, None]) & col_ok[None, :]
    target += tl.sum(tl.where(is_target, x, 0.0), axis=1)
    new_max = tl.maximum(run_max, tl.max(x, axis=1))
    new_max = tl.where(new_max == float("-inf"), 0.0, new_max)  # fully masked rows stay finite
    run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(x - new_max[:, None]), axis=1)
    return new_max, run_sum, target


@triton.jit
def store_parts(PART_MAX, PART_SUM, PART_TGT, offs_n, row_ok, num_parts, part, run_max, run_sum, target):
    """Write one slice's (max, sum-exp, target) into column ``part`` of the [N, num_parts] buffers."""
    out = offs_n.to(tl.int64) * num_parts + part
    tl.store(PART_MAX + out, run_max, mask=row_ok)
    tl.store(PART_SUM + out, run_sum, mask=row_ok)
    tl.store(PART_TGT + out, target, mask=row_ok)
