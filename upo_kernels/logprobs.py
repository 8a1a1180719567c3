"""Triton per-token log-probs from logits the caller already has (no fused matmul).

Forward: one program per block of rows walks the vocabulary with an online logsumexp and
picks the target logit; writes ``logp`` and ``lse`` only. Backward: ``g (onehot - softmax)``
written tile by tile into the gradient buffer.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from upo_kernels import buffers
from upo_kernels.tile_math import online_init, online_logsumexp


@triton.jit
def logprobs_fwd_kernel(Z, Y, LOGP, LSE, N, V, stride_zn, ignore_index,
                        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_n < N
    labels = tl.load(Y + offs_n, mask=row_ok, other=-1)
    rows = Z + offs_n.to(tl.int64)[:, None] * stride_zn
    run_max, run_sum, target = online_init(BLOCK_N)
    for v0 in range(0, V, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        col_ok = offs_v < V
        z = tl.load(rows + offs_v[None, :], mask=row_ok[:, None] & col_ok[None, :], other=float("-inf"))
        run_max, run_sum, target = online_logsumexp(z.to(tl.float32), offs_v, col_ok, labels, run_max, run_sum,
                                                    target)
    lse = run_max + tl.log(tl.maximum(run_sum, 1e-30))  # valid rows have run_sum >= 1
    logp = tl.where(labels == ignore_index, 0.0, target - lse)
    tl.store(LSE + offs_n, lse, mask=row_ok)
    tl.store(LOGP + offs_n, logp, mask=row_ok)


@triton.jit
def logprobs_bwd_kernel(Z, DZ, Y, G, LSE, N, V, stride_zn, stride_dn,
                        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    offs_v = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_n < N
    mask = row_ok[:, None] & (offs_v < V)[None, :]
    rows = offs_n.to(tl.int64)[:, None]
    z = tl.load(Z + rows * stride_zn + offs_v[None, :], mask=mask, other=0.0).to(tl.float32)
    labels = tl.load(Y + offs_n, mask=row_ok, other=-1)
    g = tl.load(G + offs_n, mask=row_ok, other=0.0)
    lse = tl.load(LSE + offs_n, mask=row_ok, other=0.0)
    onehot = tl.where(offs_v[None, :] == labels[:, None], 1.0, 0.0)
    dz = g[:, None] * (onehot - tl.exp(z - lse[:, None]))
    tl.store(DZ + rows * stride_dn + offs_v[None, :], dz.to(DZ.dtype.element_ty), mask=mask)


def _blocks():
    import os

    return (16, 32) if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") else (16, 1024)


def forward(logits, labels, ignore_index=-100):
    n_tokens, vocab = logits.shape
    logp = buffers.empty((n_tokens,), torch.float32, logits.device)
    lse = buffers.empty((n_tokens,), torch.float32, logits.device)
    block_n, block_v = _blocks()
    if n_tokens:
        logprobs_fwd_kernel[(triton.cdiv(n_tokens, block_n),)](
            logits, labels, logp, lse, n_tokens, vocab, logits.stride(0), ignore_index,
            BLOCK_N=block_n, BLOCK_V=block_v)
    return logp, lse


def backward(grad_logp, logits, labels, lse, ignore_index=-100):
    n_tokens, vocab = logits.shape
    g = torch.where(labels != ignore_index, grad_logp.float(), torch.zeros((), device=logits.device))
    grad = buffers.empty(logits.shape, logits.dtype, logits.device)
    block_n, block_v = _blocks()
    if n_tokens:
        grid = (triton.cdiv(vocab, block_v), triton.cdiv(n_tokens, block_n))
        logprobs_bwd_kernel[grid](logits, grad, labels, g, lse, n_tokens, vocab, logits.stride(0),
                                  grad.stride(0), BLOCK_N=block_n, BLOCK_V=block_v)
    return grad
