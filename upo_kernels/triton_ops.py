"""Host side of the Triton backend: launch configuration, split merging, tiled backward.

Forward: the fused kernel (``linear_logprobs_fwd.py``, default) or, with
``UPO_FWD_IMPL=cublas``, cuBLAS logit tiles reduced by ``logsumexp_tile.py``. Backward: cuBLAS
logit tiles turned into ``dz`` by ``linear_logprobs_bwd.py``, then two cuBLAS products per
tile. Same contract as ``upo_kernels.chunked.linear_logprobs_forward/backward`` so that
``functional.py`` dispatches to either without knowing which.
"""
from __future__ import annotations

import os

import torch
import triton

from upo_kernels import buffers, token_stats
from upo_kernels.linear_logprobs_fwd import linear_logprobs_fwd_kernel
from upo_kernels.linear_logprobs_bwd import softmax_grad_epilogue_kernel
from upo_kernels.logsumexp_tile import logsumexp_tile_kernel

# fp32 working set of the tile passes, MB (env overrides, read at each call): the one
# [group, vocab-chunk] logit tile alive at a time, and the backward's [group, D] grad_hidden
# accumulator. At D = 4096 that is 4096-token groups and 4096-column tiles: large enough for
# cuBLAS to run at full speed, ~130 MB of working memory in all.
DEFAULT_TILE_MB = 64
DEFAULT_GROUP_MB = 64


def _budget_bytes(name, default_mb):
    value = os.environ.get(name)
    try:
        mb = float(value) if value else default_mb
    except ValueError:
        mb = float("nan")
    if not mb > 0:
        raise ValueError(f"{name} must be a positive number of MB, got {value!r}")
    return int(mb * 2**20)


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


def forward_impl() -> str:
    """``fused`` (one Triton kernel, no logit tile in memory) or ``cublas`` (cuBLAS tiles + epilogue)."""
    impl = os.environ.get("UPO_FWD_IMPL", "fused")
    if impl not in ("fused", "cublas"):
        raise ValueError(f"UPO_FWD_IMPL must be 'fused' or 'cublas', got {impl!r}")
    return impl


def logits_mode() -> str:
    """``fp32`` (default): logit tiles stay fp32, a softmax more exact than the naive path's.
    ``input``: 16-bit inputs get their logits rounded to that dtype, as cuBLAS writes them in the
    naive path and TRL (half the tile traffic); forward and backward round the same way, so the
    softmax stays consistent. fp32 inputs are unaffected."""
    mode = os.environ.get("UPO_LOGITS", "fp32")
    if mode not in ("fp32", "input"):
        raise ValueError(f"UPO_LOGITS must be 'fp32' or 'input', got {mode!r}")
    return mode


def call_options() -> dict:
    """The environment-selected variants, read once per forward; its backward reuses them."""
    return {"fwd_impl": forward_impl(), "logits": logits_mode()}


def _part_buffers(n_tokens, slices, device, stats=()):
    """(max, sum-exp, target) [N, slices] fp32, and the statistics' [4, N, slices] (None without)."""
    parts = tuple(buffers.empty((n_tokens, slices), torch.float32, device) for _ in range(3))
    return parts + (token_stats.part_buffer(n_tokens, slices, torch.float32, device) if stats else None,)


def _stats_args(part_stats, fallback):
    """The kernels' (PART_STATS, stat_stride) arguments; any pointer when no statistic is asked."""
    return (fallback, 0) if part_stats is None else (part_stats, part_stats.stride(0))


def _rounds_logits(logits, dtype):
    return logits == "input" and dtype in (torch.float16, torch.bfloat16)


def forward(hidden, weight, labels, bias=None, logit_scale=1.0, softcap=None, ignore_index=-100,
            chunk_tokens=None, chunk_vocab=None, fwd_impl=None, logits=None, stats=()):
    """hidden [N, D], weight [V, D], labels [N] int64 -> (logp [N] fp32, lse [N] fp32), and a
    third element ``{name: [N] fp32}`` when ``stats`` (names of ``token_stats.STATS``) are asked.

    ``fwd_impl`` / ``logits``: see ``forward_impl()`` / ``logits_mode()`` (default: from the
    environment)."""
    logits = logits or logits_mode()
    if (fwd_impl or forward_impl()) == "cublas":
        return _forward_cublas(hidden, weight, labels, bias, logit_scale, softcap, ignore_index,
                               chunk_tokens, chunk_vocab, logits, stats)
    n_tokens, dim = hidden.shape
    vocab = weight.shape[0]
    block_n, block_v, block_d, warps, stages = forward_config(hidden.dtype)
    splits = _num_splits(n_tokens, vocab, block_n, block_v, hidden.device)
    vocab_per_split = triton.cdiv(triton.cdiv(vocab, splits), block_v) * block_v
    splits = triton.cdiv(vocab, vocab_per_split)
    part_max, part_sum, part_tgt, part_stats = _part_buffers(n_tokens, splits, hidden.device, stats)
    if n_tokens:
        grid = (splits, triton.cdiv(n_tokens, block_n))
        linear_logprobs_fwd_kernel[grid](
            hidden, weight, bias if bias is not None else hidden, labels,
            part_max, part_sum, part_tgt, *_stats_args(part_stats, part_max),
            n_tokens, vocab, dim, hidden.stride(0), weight.stride(0),
            vocab_per_split, splits, float(logit_scale), float(softcap or 1.0),
            HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None,
            ROUND_LOGITS=_rounds_logits(logits, hidden.dtype), DOT_PRECISION=_dot_precision(hidden.dtype),
            BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_D=block_d, **token_stats.kernel_flags(stats),
            num_warps=warps, num_stages=stages,
        )
    return token_stats.merge_parts(part_max, part_sum, part_tgt, labels, ignore_index, part_stats, stats, vocab)


def _epilogue_blocks():
    return (16, 32) if interpreting() else (16, 256)


def _forward_cublas(hidden, weight, labels, bias, logit_scale, softcap, ignore_index, chunk_tokens,
                    chunk_vocab, logits, stats=()):
    """cuBLAS ``z = H_g W_c^T`` tiles (fp32 out, or 16-bit with ``logits="input"``) reduced by
    ``logsumexp_tile_kernel``; the same token groups and vocabulary chunks as the backward, so
    one tile is alive at a time."""
    rounded = _rounds_logits(logits, hidden.dtype)
    n_tokens = hidden.shape[0]
    vocab = weight.shape[0]
    group, chunk = _tiles(n_tokens, hidden.shape[1], vocab, chunk_tokens, chunk_vocab)
    tiles = triton.cdiv(vocab, chunk)
    part_max, part_sum, part_tgt, part_stats = _part_buffers(n_tokens, tiles, hidden.device, stats)
    block_n, block_v = _epilogue_blocks()
    for r0 in range(0, n_tokens, group):
        r1 = min(r0 + group, n_tokens)
        h_g, fp32_cache = hidden[r0:r1], {}
        for tile, v0 in enumerate(range(0, vocab, chunk)):
            v1 = min(v0 + chunk, vocab)
            z = _logit_chunk(h_g, weight[v0:v1], fp32_cache, rounded)
            logsumexp_tile_kernel[(triton.cdiv(r1 - r0, block_n),)](
                z, bias if bias is not None else z, labels[r0:r1],
                part_max[r0:r1], part_sum[r0:r1], part_tgt[r0:r1],
                *_stats_args(None if part_stats is None else part_stats[:, r0:r1], z),
                r1 - r0, v1 - v0, v0, z.stride(0), tiles, tile, float(logit_scale), float(softcap or 1.0),
                HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None,
                BLOCK_N=block_n, BLOCK_V=block_v, **token_stats.kernel_flags(stats), num_warps=4,
            )
    return token_stats.merge_parts(part_max, part_sum, part_tgt, labels, ignore_index, part_stats, stats, vocab)


def _tiles(n_tokens, dim, vocab, chunk_tokens=None, chunk_vocab=None):
    """(token group, vocabulary chunk) of the tile passes: the fp32 ``[group, D]`` grad_hidden
    accumulator fits ``UPO_GROUP_MB`` and the fp32 ``[group, chunk]`` logit tile ``UPO_TILE_MB``."""
    n = max(1, n_tokens)
    if chunk_tokens is not None:
        group = max(1, min(n, chunk_tokens))
    else:
        group = min(n, max(128, _budget_bytes("UPO_GROUP_MB", DEFAULT_GROUP_MB) // (4 * dim) // 128 * 128))
        groups = triton.cdiv(n, group)
        group = min(n, triton.cdiv(triton.cdiv(n, groups), 128) * 128)  # equal groups, no small tail
    if chunk_vocab is not None:
        chunk = max(1, min(vocab, chunk_vocab))
    else:
        chunk = max(128, min(vocab, _budget_bytes("UPO_TILE_MB", DEFAULT_TILE_MB) // (4 * group) // 128 * 128))
    return group, chunk


# Which cuBLAS paths this process could use (reported by the benchmarks).
PATHS = {"logits_fp32": None, "grad_hidden_fp32_out": None}


def _logit_chunk(hidden, w_c, fp32_cache, rounded=False):
    """``hidden @ w_c.T`` in fp32, or in the 16-bit input dtype when ``rounded``.

    Forward and backward must see the same logits: rounding them in one pass only would make
    ``exp(z - lse)`` an inconsistent softmax, worse than a naive bf16 implementation. For
    16-bit inputs cuBLAS writes fp32 directly where torch offers ``out_dtype``; elsewhere (CPU,
    older torch) the product runs on fp32 copies (``fp32_cache`` keeps the hidden copy across
    chunks).
    """
    if rounded or hidden.dtype not in (torch.float16, torch.bfloat16):
        return torch.mm(hidden, w_c.t())
    if PATHS["logits_fp32"] is not False:
        try:
            z = torch.mm(hidden, w_c.t(), out_dtype=torch.float32)
            PATHS["logits_fp32"] = True
            return z
        except torch.cuda.OutOfMemoryError:
            raise
        except (TypeError, RuntimeError):  # older torch, or a device without the dtype variant
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
        except torch.cuda.OutOfMemoryError:
            raise
        except (TypeError, RuntimeError):  # older torch, or a device without the dtype variant
            PATHS["grad_hidden_fp32_out"] = False
    acc.addmm_(a.float(), b.float())  # tile-sized fp32 copies: rounding each product to 16 bits would not be exact


def backward(grad_logp, hidden, weight, labels, lse, bias=None, logit_scale=1.0, softcap=None,
             ignore_index=-100, needs_weight_grad=True, needs_bias_grad=True, needs_hidden_grad=True,
             chunk_tokens=None, chunk_vocab=None, rows=None, fwd_impl=None, logits=None):
    """Recompute the logits in ``[group, chunk]`` tiles: token groups outside, vocabulary inside.

    Per tile: ``z = H_g W_c^T`` (cuBLAS, fp32 out) -> Triton epilogue writes ``dz`` over ``z``
    -> ``dH_g += dz W_c`` into an fp32 ``[group, D]`` accumulator (rounded once into grad_h
    when the group is done) and ``dW_c (+)= dz^T H_g``. With one group each ``dW_c`` is one
    product over all tokens, rounded once; with G groups it is summed in weight's dtype over G
    products (each summed in fp32 by cuBLAS), G roundings. That is the price of never holding a
    full-size fp32 accumulator: grad_weight in fp32 is 2 GB at V = 128k, D = 4096, and
    grad_hidden in fp32 grows with the tokens (256 MB at 16k tokens).
    ``rows`` (int64 [M], optional): token ``t`` is row ``rows[t]`` of ``hidden``; each group's
    rows are gathered (a group-sized copy) and their gradient scattered back, other rows get 0.
    ``logits`` must be the forward's (``fwd_impl`` is the forward's only).
    Returns (grad_h in hidden's dtype, grad_w in weight's dtype, grad_b fp32); None for a
    gradient that is not needed.
    """
    rounded = _rounds_logits(logits or logits_mode(), hidden.dtype)
    n_tokens, dim = labels.shape[0], hidden.shape[1]
    vocab = weight.shape[0]
    keep = labels != ignore_index
    g = torch.where(keep, grad_logp.float(), torch.zeros((), device=hidden.device))
    if not needs_hidden_grad:  # e.g. training the LM head alone: no dH products at all
        grad_h = None
    elif rows is None:
        grad_h = buffers.empty((n_tokens, dim), hidden.dtype, hidden.device)
    else:
        grad_h = torch.zeros((hidden.shape[0], dim), dtype=hidden.dtype, device=hidden.device)
    grad_w = None
    if needs_weight_grad:  # an empty batch writes no tile: its weight gradient is zero
        grad_w = buffers.empty(weight.shape, weight.dtype, weight.device)
        if not n_tokens:
            grad_w.zero_()
    want_b = bias is not None and needs_bias_grad
    grad_b = torch.zeros((vocab,), dtype=torch.float32, device=hidden.device) if want_b else None
    group, chunk = _tiles(n_tokens, dim, vocab, chunk_tokens, chunk_vocab)
    # fp32 inputs without ``rows`` accumulate straight into grad_h; else one reused fp32 group buffer
    direct = hidden.dtype == torch.float32 and rows is None
    acc = None
    if grad_h is not None and not direct:
        acc = torch.empty((min(group, n_tokens), dim), dtype=torch.float32, device=hidden.device)
    block_n, block_v = _epilogue_blocks()
    for r0 in range(0, n_tokens, group):
        r1 = min(r0 + group, n_tokens)
        h_g = hidden[r0:r1] if rows is None else hidden.index_select(0, rows[r0:r1])
        fp32_cache = {}
        acc_g = None if grad_h is None else grad_h[r0:r1] if acc is None else acc[: r1 - r0]
        if acc_g is not None:
            acc_g.zero_()
        for v0 in range(0, vocab, chunk):
            v1 = min(v0 + chunk, vocab)
            w_c = weight[v0:v1]
            z = _logit_chunk(h_g, w_c, fp32_cache, rounded)
            # The interpreter truncates fp32 -> bf16 where the GPU rounds to nearest: there the
            # kernel writes fp32 and torch rounds, so CPU tests see the GPU's arithmetic.
            if interpreting():
                dz = z if z.dtype == torch.float32 else torch.empty(z.shape, dtype=torch.float32, device=z.device)
            else:
                dz = _grad_view(z, hidden.dtype)
            softmax_grad_epilogue_kernel[(triton.cdiv(r1 - r0, block_n),)](
                z, dz, bias if bias is not None else z, labels[r0:r1], g[r0:r1], lse[r0:r1],
                r1 - r0, v1 - v0, v0, z.stride(0), dz.stride(0), float(logit_scale), float(softcap or 1.0),
                HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None,
                BLOCK_N=block_n, BLOCK_V=block_v, num_warps=4,
            )
            dz = dz.to(hidden.dtype)
            if acc_g is not None:
                _accumulate_fp32(acc_g, dz, w_c)
            if grad_w is not None:
                if r0 == 0:
                    torch.mm(dz.t(), h_g, out=grad_w[v0:v1])
                else:
                    grad_w[v0:v1].addmm_(dz.t(), h_g)
            if grad_b is not None:
                grad_b[v0:v1] += dz.sum(dim=0, dtype=torch.float32)
        if grad_h is None:
            continue
        if rows is not None:
            grad_h.index_copy_(0, rows[r0:r1], acc_g.to(hidden.dtype))
        elif acc is not None:
            grad_h[r0:r1].copy_(acc_g)
    return grad_h, grad_w, grad_b
