"""Host side of the Triton backend: launch configuration, split merging, chunked backward.

Same contract as ``upo_kernels.chunked.linear_logprobs_forward/backward`` so that
``functional.py`` dispatches to either without knowing which.
"""
from __future__ import annotations

import os

import torch
import triton

from upo_kernels import buffers
from upo_kernels.linear_logprobs_fwd import linear_logprobs_fwd_kernel
from upo_kernels.linear_logprobs_bwd import softmax_grad_epilogue_kernel

# Bytes allowed for the one [tokens, vocab-chunk] tile the backward keeps (env override, MB).
BACKWARD_TILE_BYTES = int(os.environ.get("UPO_BWD_TILE_MB", "64")) * 2**20


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _env_config(name):
    value = os.environ.get(name)
    return tuple(int(x) for x in value.split(",")) if value else None


def forward_config(dtype: torch.dtype):
    """(BLOCK_N, BLOCK_V, BLOCK_D, num_warps, num_stages) for the forward kernel."""
    override = _env_config("UPO_TRITON_FWD")
    if override:
        return override
    if interpreting():
        return 16, 32, 32, 1, 1  # small tiles: the interpreter's cost is per element
    if dtype == torch.float32:
        return 64, 64, 32, 4, 2  # exact fp32 ("ieee") dots, no tensor cores
    return 256, 128, 64, 8, 3  # best of a sweep on an H200 (benchmarks/results/h200-probe-1)


def _num_splits(n_tokens, vocab, block_n, block_v, device):
    vocab_tiles = triton.cdiv(vocab, block_v)
    if interpreting():
        return min(vocab_tiles, 3)  # still exercises the split merge, keeps tests quick
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    token_blocks = triton.cdiv(n_tokens, block_n)
    # ~sqrt(#SMs) splits keep the concurrent working set in L2; more when tokens are few.
    return max(1, min(vocab_tiles, max(16, triton.cdiv(4 * sms, token_blocks))))


def _dot_precision(dtype):
    return "ieee" if dtype == torch.float32 else "tf32"


def forward(hidden, weight, labels, bias=None, logit_scale=1.0, softcap=None, ignore_index=-100,
            **_chunks):
    """hidden [N, D], weight [V, D], labels [N] int64 -> (logp [N] fp32, lse [N] fp32)."""
    n_tokens, dim = hidden.shape
    vocab = weight.shape[0]
    block_n, block_v, block_d, warps, stages = forward_config(hidden.dtype)
    splits = _num_splits(n_tokens, vocab, block_n, block_v, hidden.device)
    vocab_per_split = triton.cdiv(triton.cdiv(vocab, splits), block_v) * block_v
    splits = triton.cdiv(vocab, vocab_per_split)
    part_max = buffers.empty((n_tokens, splits), torch.float32, hidden.device)
    part_sum = buffers.empty((n_tokens, splits), torch.float32, hidden.device)
    part_tgt = buffers.empty((n_tokens, splits), torch.float32, hidden.device)
    if n_tokens:
        grid = (splits, triton.cdiv(n_tokens, block_n))
        linear_logprobs_fwd_kernel[grid](
            hidden, weight, bias if bias is not None else hidden, labels,
            part_max, part_sum, part_tgt,
            n_tokens, vocab, dim, hidden.stride(0), weight.stride(0),
            vocab_per_split, splits, float(logit_scale), float(softcap or 1.0),
            HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None,
            DOT_PRECISION=_dot_precision(hidden.dtype),
            BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_D=block_d, num_warps=warps, num_stages=stages,
        )
    top = part_max.max(dim=1).values
    lse = top + torch.log((part_sum * torch.exp(part_max - top.unsqueeze(1))).sum(dim=1))
    keep = labels != ignore_index
    logp = torch.where(keep, part_tgt.sum(dim=1) - lse, torch.zeros_like(lse))
    return logp, lse


def _vocab_chunk(n_tokens, vocab, tile_elem_size, chunk_vocab):
    if chunk_vocab is not None:
        return max(1, min(vocab, chunk_vocab))
    cols = BACKWARD_TILE_BYTES // max(1, n_tokens * tile_elem_size)
    return max(128, min(vocab, cols // 128 * 128))


# Which cuBLAS paths this process could use (reported by the benchmarks).
PATHS = {"logits_fp32": None, "grad_hidden_fp32_out": None}


def _logit_chunk(hidden, w_c, fp32_cache):
    """fp32 ``hidden @ w_c.T``: the recomputed softmax must match the forward's fp32 logsumexp.

    For 16-bit inputs cuBLAS writes fp32 directly where torch offers ``out_dtype``; elsewhere
    (CPU, older torch) the product runs on fp32 copies (``fp32_cache`` keeps the hidden copy
    across chunks). Rounding the logits to 16 bits first would make ``exp(z - lse)`` an
    inconsistent softmax, worse than a naive bf16 implementation.
    """
    if hidden.dtype not in (torch.float16, torch.bfloat16):
        return torch.mm(hidden, w_c.t())
    if PATHS["logits_fp32"] is not False:
        try:
            z = torch.mm(hidden, w_c.t(), out_dtype=torch.float32)
            PATHS["logits_fp32"] = True
            return z
        except (TypeError, RuntimeError):
            PATHS["logits_fp32"] = False
    if "hidden" not in fp32_cache:
        fp32_cache["hidden"] = hidden.float()
    return torch.mm(fp32_cache["hidden"], w_c.float().t())


def _grad_view(z, dtype):
    """The buffer the epilogue writes ``dz`` into: ``z`` itself, or its first half per row."""
    if z.dtype == dtype:
        return z
    return z.view(dtype)[:, : z.shape[1]]


def _accumulate_fp32(acc, a, b):
    """acc (fp32) += a @ b, with fp32 output from 16-bit inputs when cuBLAS offers it."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
        return
    if PATHS["grad_hidden_fp32_out"] is not False:
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            PATHS["grad_hidden_fp32_out"] = True
            return
        except (TypeError, RuntimeError):  # older torch, or a device without the dtype variant
            PATHS["grad_hidden_fp32_out"] = False
    acc += torch.mm(a, b).float()


def backward(grad_logp, hidden, weight, labels, lse, bias=None, logit_scale=1.0, softcap=None,
             ignore_index=-100, needs_weight_grad=True, needs_bias_grad=True, chunk_vocab=None,
             **_chunks):
    """Chunked recompute over the vocabulary (one [N, chunk] tile alive at a time).

    Per chunk: ``z = H W_c^T`` (cuBLAS) -> Triton epilogue writes ``dz`` over ``z`` ->
    ``dW_c = dz^T H`` written once (exact: one product sums over all tokens) and
    ``dH += dz W_c`` into an fp32 accumulator. Returns (grad_h fp32, grad_w in weight's dtype,
    grad_b fp32).
    """
    n_tokens, dim = hidden.shape
    vocab = weight.shape[0]
    keep = labels != ignore_index
    g = torch.where(keep, grad_logp.float(), torch.zeros((), device=hidden.device))
    grad_h = torch.zeros((n_tokens, dim), dtype=torch.float32, device=hidden.device)
    grad_w = buffers.empty(weight.shape, weight.dtype, weight.device) if needs_weight_grad else None
    want_b = bias is not None and needs_bias_grad
    grad_b = buffers.empty((vocab,), torch.float32, hidden.device) if want_b else None
    chunk = _vocab_chunk(n_tokens, vocab, 4, chunk_vocab)
    block_n, block_v = (16, 32) if interpreting() else (16, 256)
    fp32_cache = {}
    for v0 in range(0, vocab, chunk):
        v1 = min(v0 + chunk, vocab)
        w_c = weight[v0:v1]
        z = _logit_chunk(hidden, w_c, fp32_cache)
        # The interpreter truncates fp32 -> bf16 where the GPU rounds to nearest: there the
        # kernel writes fp32 and torch rounds, so CPU tests see the GPU's arithmetic.
        dz = z if interpreting() else _grad_view(z, hidden.dtype)
        if n_tokens:
            softmax_grad_epilogue_kernel[(triton.cdiv(n_tokens, block_n),)](
                z, dz, bias if bias is not None else z, labels, g, lse,
                n_tokens, v1 - v0, v0, z.stride(0), dz.stride(0), float(logit_scale), float(softcap or 1.0),
                HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None,
                BLOCK_N=block_n, BLOCK_V=block_v, num_warps=4,
            )
        dz = dz.to(hidden.dtype)
        _accumulate_fp32(grad_h, dz, w_c)
        if grad_w is not None:
            torch.mm(dz.t(), hidden, out=grad_w[v0:v1])
        if grad_b is not None:
            grad_b[v0:v1] = dz.sum(dim=0, dtype=torch.float32)
    return grad_h, grad_w, grad_b
