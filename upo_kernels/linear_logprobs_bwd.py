"""Triton backward epilogue: turn a recomputed logit tile into ``d loss / d raw logits``.

The backward pass walks the vocabulary in chunks: ``z = H W_c^T`` (a cuBLAS product, fp32
output where cuBLAS offers it), then this kernel writes
``dz = scale * cap'(x) * g_t * (onehot(y_t) - exp(zf - lse_t))``, where ``zf = cap(scale * (z + b))``
is the logit the forward saw, ``g_t = dL/dlogp_t`` and ``cap'`` the soft-cap derivative.
``dH += dz W_c`` and ``dW_c = dz^T H`` follow as cuBLAS products.

``dz`` (the matmul dtype) may alias ``z`` (fp32): row ``i`` of ``dz`` lives in the first half
of row ``i``'s bytes. That is safe because one program owns whole rows and walks the column
tiles in order: tile ``k`` of ``dz`` only overwrites bytes of ``z`` tiles ``<= k``, which the
program has already loaded. Nothing of size ``N x V`` is ever allocated.
"""
from __future__ import annotations

import triton
import triton.language as tl

from upo_kernels.tile_math import capped_logits, row_block


@triton.jit
def softmax_grad_epilogue_kernel(
    Z, DZ,                   # [N, VC] raw logits h . W_c^T (read), dz (written; may alias Z)
    BIAS, Y, G, LSE,         # bias [V] (full), labels [N], coefficients [N] fp32, lse [N] fp32
    N, VC, v_offset, stride_zn, stride_dn,
    logit_scale, softcap,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
):
    offs_n, row_ok, rows = row_block(N, BLOCK_N)
    labels = tl.load(Y + offs_n, mask=row_ok, other=-1)
    g = tl.load(G + offs_n, mask=row_ok, other=0.0)
    lse = tl.load(LSE + offs_n, mask=row_ok, other=0.0)
    for v0 in range(0, VC, BLOCK_V):  # in order: required for the aliasing argument above
        offs_v = v0 + tl.arange(0, BLOCK_V)
        col_ok = offs_v < VC
        mask = row_ok[:, None] & col_ok[None, :]
        z = tl.load(Z + rows * stride_zn + offs_v[None, :], mask=mask, other=0.0).to(tl.float32)
        x, t = capped_logits(z, BIAS, v_offset + offs_v, col_ok, logit_scale, softcap, HAS_BIAS, HAS_SOFTCAP)
        prob = tl.exp(x - lse[:, None])
        onehot = (offs_v[None, :] + v_offset) == labels[:, None]
        dz = g[:, None] * (tl.where(onehot, 1.0, 0.0) - prob) * logit_scale
        if HAS_SOFTCAP:
            dz = dz * (1.0 - t * t)
        tl.debug_barrier()  # every lane has loaded this tile before any lane overwrites it
        tl.store(DZ + rows * stride_dn + offs_v[None, :], dz.to(DZ.dtype.element_ty), mask=mask)
