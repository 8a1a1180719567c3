"""Attention of a block of queries over a prefix (every key) and over the block's own keys (causally).

Prompt sharing's rejected response attends to the prompt and to itself, not to the chosen response between them:
query ``i`` of the block sees all ``P`` prefix keys and keys ``0..i`` of its own ``R``. As one masked SDPA call over
``[prefix, block]`` that costs a ``[R, P + R]`` mask (a float copy kept for backward: 16 MiB at ``R = 1024``,
``P = 3072``), a concatenated copy of the keys and values, and the masked-out half of the block's own scores.

On CPU this runs as two of SDPA's flash kernels instead, the prefix without a mask and the block causally, and
merges them by their log-sum-exps. Their backward is exact when each half is given the MERGED output and
log-sum-exp (the softmax's normaliser is the merged one; each key's gradient needs only its own scores), so
nothing beyond the two halves' outputs is computed or kept. Elsewhere (CUDA, dropout) it is one SDPA call over the
concatenated keys with a bottom-right-aligned causal bias (no mask is built); the masked call remains as the tests'
and the benchmark's comparison.
"""
from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import CausalBias, causal_lower_right

_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_CPU_FLASH_BACKWARD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)


def prefix_causal_attention(query: torch.Tensor, prefix_key: torch.Tensor, prefix_value: torch.Tensor,
                            key: torch.Tensor, value: torch.Tensor, scale: float | None = None,
                            dropout_p: float = 0.0) -> torch.Tensor:
    """``query`` ``[B, H, R, d]``; ``prefix_key``/``prefix_value`` ``[B, KVH, P, d]``; ``key``/``value``
    ``[B, KVH, R, d]`` (``KVH`` dividing ``H``: grouped-query heads). Query ``i`` attends every prefix key and keys
    ``0..i`` of its block; returns ``[B, H, R, d]``. ``scale`` defaults to ``1 / sqrt(d)`` as in SDPA. Under
    autocast every input is cast to autocast's dtype first, as autocast does for SDPA (a model's rotated queries
    may be fp32 beside bf16 values)."""
    if torch.is_autocast_enabled(query.device.type):
        dtype = torch.get_autocast_dtype(query.device.type)
        query, prefix_key, prefix_value, key, value = (t.to(dtype) for t in (query, prefix_key, prefix_value, key,
                                                                             value))
    _check_shapes(query, prefix_key, prefix_value, key, value)
    blocks, prefix = query.shape[2], prefix_key.shape[2]
    groups = query.shape[1] // key.shape[1]
    if blocks == 0 or prefix == 0:  # the CPU kernels crash on empty queries; no prefix is plain causal attention
        return F.scaled_dot_product_attention(query, key, value, dropout_p=dropout_p, is_causal=True, scale=scale,
                                              enable_gqa=groups > 1)
    if query.device.type == "cpu" and dropout_p == 0.0 and _CPU_FLASH_BACKWARD is not None:
        return _PrefixCausalAttentionCPU.apply(query, prefix_key, prefix_value, key, value, scale)
    return prefix_causal_attention_lower_right(query, prefix_key, prefix_value, key, value, scale, dropout_p)


def prefix_causal_attention_lower_right(query, prefix_key, prefix_value, key, value, scale=None, dropout_p=0.0):
    """The same attention as SDPA over the concatenated keys with a causal mask aligned to the bottom right
    (``torch.nn.attention.bias.causal_lower_right``: query ``i`` of ``R`` sees keys ``0..P+i``), which SDPA's
    kernels apply without building an ``[R, P + R]`` mask (the branch off CPU; the CPU tests force it)."""
    groups = query.shape[1] // key.shape[1]
    keys, values = torch.cat([prefix_key, key], dim=2), torch.cat([prefix_value, value], dim=2)
    bias = causal_lower_right(query.shape[2], keys.shape[2])
    grouped = groups > 1 and causal_bias_takes_grouped_heads()
    if groups > 1 and not grouped:
        keys, values = keys.repeat_interleave(groups, dim=1), values.repeat_interleave(groups, dim=1)
    extra = {"enable_gqa": True} if grouped else {}
    return F.scaled_dot_product_attention(query, keys, values, attn_mask=bias, dropout_p=dropout_p, scale=scale,
                                          **extra)


def causal_bias_takes_grouped_heads() -> bool:
    """Whether this torch's ``CausalBias`` dispatch takes ``enable_gqa`` (torch 2.13 does); else heads are
    repeated."""
    return "enable_gqa" in inspect.signature(CausalBias._dispatch).parameters


def prefix_causal_attention_masked(query, prefix_key, prefix_value, key, value, scale=None, dropout_p=0.0):
    """The same attention as one masked SDPA call over the concatenated keys (the fallback, and the comparison of
    the tests and the benchmark)."""
    prefix, blocks = prefix_key.shape[2], key.shape[2]
    groups = query.shape[1] // key.shape[1]
    keys, values = torch.cat([prefix_key, key], dim=2), torch.cat([prefix_value, value], dim=2)
    grouped = groups > 1 and masked_kernel_takes_grouped_heads(query.device)
    if groups > 1 and not grouped:
        keys, values = keys.repeat_interleave(groups, dim=1), values.repeat_interleave(groups, dim=1)
    position = torch.arange(prefix + blocks, device=query.device)
    allowed = (position[None, :] < prefix) | (position[None, :] - prefix <= position[:blocks, None])
    return F.scaled_dot_product_attention(query, keys, values, attn_mask=allowed, dropout_p=dropout_p, scale=scale,
                                          enable_gqa=grouped)


def masked_kernel_takes_grouped_heads(device: torch.device) -> bool:
    """CUDA's masked SDPA kernel (memory-efficient) takes no grouped heads: the keys and values are repeated there.
    The CPU kernel takes a mask and grouped heads, and the repeat would save groups x the keys and values."""
    return device.type == "cpu"


def _check_shapes(query, prefix_key, prefix_value, key, value) -> None:
    if query.dim() != 4:
        raise ValueError(f"query must be [batch, heads, tokens, head_dim], got shape {tuple(query.shape)}")
    batch, heads, blocks, head_dim = query.shape
    for name, tensor, tokens in (("prefix_key", prefix_key, None), ("prefix_value", prefix_value, prefix_key.shape[2]),
                                 ("key", key, blocks), ("value", value, blocks)):
        if tensor.dim() != 4 or tensor.shape[0] != batch or tensor.shape[3] != head_dim:
            raise ValueError(f"{name} must be [{batch}, kv_heads, tokens, {head_dim}] like query, got shape "
                             f"{tuple(tensor.shape)}")
        if tokens is not None and tensor.shape[2] != tokens:
            raise ValueError(f"{name} must have {tokens} tokens, got {tensor.shape[2]}")
        if tensor.shape[1] != key.shape[1] or heads % tensor.shape[1]:
            raise ValueError(f"{name} has {tensor.shape[1]} heads: key and value heads must be equal and divide the "
                             f"query's {heads}")
        if tensor.dtype != query.dtype or tensor.device != query.device:
            raise ValueError(f"{name} is {tensor.dtype} on {tensor.device}, query {query.dtype} on {query.device}")


class _PrefixCausalAttentionCPU(torch.autograd.Function):
    """Two flash halves merged by log-sum-exp; each half's backward from the merged output and log-sum-exp."""

    @staticmethod
    def forward(ctx, query, prefix_key, prefix_value, key, value, scale):
        out_prefix, lse_prefix = _CPU_FLASH(query, prefix_key, prefix_value, 0.0, False, scale=scale)
        out_block, lse_block = _CPU_FLASH(query, key, value, 0.0, True, scale=scale)
        lse = torch.logaddexp(lse_prefix, lse_block)  # fp32 [B, H, R]
        out = (out_prefix * (lse_prefix - lse).exp().unsqueeze(-1)
               + out_block * (lse_block - lse).exp().unsqueeze(-1)).to(query.dtype)
        ctx.save_for_backward(query, prefix_key, prefix_value, key, value, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, prefix_key, prefix_value, key, value, out, lse = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_query, grad_prefix_key, grad_prefix_value = _CPU_FLASH_BACKWARD(
            grad_out, query, prefix_key, prefix_value, out, lse, 0.0, False, scale=ctx.scale)
        grad_query_block, grad_key, grad_value = _CPU_FLASH_BACKWARD(
            grad_out, query, key, value, out, lse, 0.0, True, scale=ctx.scale)
        return grad_query + grad_query_block, grad_prefix_key, grad_prefix_value, grad_key, grad_value, None
