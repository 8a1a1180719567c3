"""The backward epilogue writes 16-bit ``dz`` over the fp32 logit tile it reads (aliasing).

Runs the kernel directly (interpreter on CPU, compiled on CUDA) on an fp32 tile with a bf16
view of its own storage as the output, and compares with the float64 formula.
"""
import math

import pytest
import torch

from upo_kernels import triton_ops
from upo_kernels.linear_logprobs_bwd import softmax_grad_epilogue_kernel

triton = pytest.importorskip("triton")


def _expected(z, bias, labels, g, lse, v_offset, scale, cap):
    x = z.double()
    if bias is not None:
        x = x + bias.double()[v_offset:v_offset + z.shape[1]]
    x = x * scale
    if cap is not None:
        t = torch.tanh(x / cap)
        x = cap * t
    prob = torch.exp(x - lse.double()[:, None])
    cols = torch.arange(z.shape[1]) + v_offset
    onehot = (cols[None, :] == labels[:, None]).double()
    dz = g.double()[:, None] * (onehot - prob) * scale
    if cap is not None:
        dz = dz * (1 - t * t)
    return dz


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale,cap,with_bias", [(1.0, None, False), (0.8, 7.0, True)])
def test_epilogue_in_place(out_dtype, scale, cap, with_bias):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    n, vc, v_offset, vocab = 37, 301, 50, 400
    z = torch.randn(n, vc, generator=gen) * 3
    bias = torch.randn(vocab, generator=gen) if with_bias else None
    labels = torch.randint(0, vocab, (n,), generator=gen)
    labels[::4] = -100
    g = torch.randn(n, generator=gen)
    g[labels == -100] = 0
    lse = torch.logsumexp(z, 1) + 1.0  # any finite normaliser; the formula does not need softmax
    expected = _expected(z, bias, labels, g, lse, v_offset, scale, cap)

    zt = z.to(device).contiguous()
    dz = triton_ops._grad_view(zt, out_dtype)
    assert dz.data_ptr() == zt.data_ptr()  # really aliased
    block_n, block_v = 16, 32
    softmax_grad_epilogue_kernel[(triton.cdiv(n, block_n),)](
        zt, dz, (bias.to(device) if bias is not None else zt), labels.to(device), g.to(device),
        lse.to(device), n, vc, v_offset, zt.stride(0), dz.stride(0), scale, cap or 1.0,
        HAS_BIAS=bias is not None, HAS_SOFTCAP=cap is not None, BLOCK_N=block_n, BLOCK_V=block_v)
    got = dz.double().cpu()
    # fp32: exact up to rounding; bf16: within one unit in the last place of each element
    # (the interpreter truncates where the GPU rounds, so allow a whole ulp)
    rel = 1e-5 if out_dtype == torch.float32 else 2 ** -7
    excess = ((got - expected).abs() - rel * expected.abs() - 1e-7).max().item()
    assert math.isfinite(excess) and excess <= 0, excess
