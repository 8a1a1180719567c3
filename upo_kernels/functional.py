"""Autograd wrappers and backend dispatch for the fused log-prob kernels.

``linear_logprobs`` is the entry point the rest of the library uses: per-token log-probs of
``labels`` straight from hidden states and the LM-head weight. Its backward receives one
coefficient per token (``dL/dlogp_t``, e.g. the per-sequence DPO coefficient) and turns it
into ``grad_hidden``, ``grad_weight`` and ``grad_bias`` by recomputing logit tiles.
"""
from __future__ import annotations

import os
from typing import NamedTuple

import torch

from upo_kernels import chunked, first_use_check, token_stats, vocab_parallel
from upo_kernels.backends import (autocast_operands, in_input_dtypes, labelled_rows, run_backward, run_forward,
                                  scattered_outputs)
from upo_kernels.backends import ops as backend_ops
from upo_kernels.nonfinite import check_finite_logprobs
from upo_kernels.token_stats import STATS as TOKEN_STATS  # noqa: F401  (re-exported by upo_kernels)

BACKENDS = ("auto", "triton", "torch")


def triton_usable_on(device: torch.device) -> bool:
    """Triton runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1``."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if backend == "triton" and not triton_usable_on(device):
        raise ValueError(
            f"backend='triton' needs CUDA tensors (got device {device}); on CPU set "
            "TRITON_INTERPRET=1 before importing upo_kernels (slow, for tests) or use backend='torch'"
        )
    return backend


def _check_finite_scalar(name, value, allow_none=False):
    if value is None and allow_none:
        return
    if not isinstance(value, (int, float)) or not (value == value) or value in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


def validate_linear_inputs(hidden, weight, labels, bias, logit_scale, softcap, ignore_index, check_labels=True):
    """Clear errors, naming the argument, before anything reaches a kernel (``check_labels``:
    the label range too, against ``weight``'s rows)."""
    for name, t in (("hidden", hidden), ("weight", weight), ("labels", labels)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not hidden.is_floating_point():
        raise TypeError(f"hidden must be a floating-point tensor, got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} does not match hidden dtype {hidden.dtype}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be [vocab, hidden_size], got shape {tuple(weight.shape)}")
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden's last dimension ({hidden.shape[-1] if hidden.dim() else None}) must equal "
            f"weight.shape[1] ({weight.shape[1]})"
        )
    if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"labels shape {tuple(labels.shape)} must equal hidden's leading shape {tuple(hidden.shape[:-1])}"
        )
    for name, t in (("weight", weight), ("labels", labels)):
        if t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but hidden is on {hidden.device}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must be a tensor of shape [{weight.shape[0]}]")
        if bias.dtype != hidden.dtype or bias.device != hidden.device:
            raise TypeError(f"bias must have hidden's dtype and device ({hidden.dtype}, {hidden.device})")
    _check_finite_scalar("logit_scale", logit_scale)
    if logit_scale <= 0:
        raise ValueError(f"logit_scale must be > 0, got {logit_scale}")
    _check_finite_scalar("softcap", softcap, allow_none=True)
    if softcap is not None and softcap <= 0:
        raise ValueError(f"softcap must be > 0 or None, got {softcap}")
    if check_labels:
        check_label_range(labels, weight.shape[0], ignore_index)


def check_label_range(labels, vocab, ignore_index):
    if labels.numel():
        kept = labels[labels != ignore_index]
        if kept.numel() and (int(kept.min()) < 0 or int(kept.max()) >= vocab):
            bad = kept[(kept < 0) | (kept >= vocab)][0].item()
            raise ValueError(f"labels must be in [0, {vocab}) or equal ignore_index={ignore_index}; found {bad}")


class _LinearLogprobs(torch.autograd.Function):
    """Only the rows with a label run through the kernels (prompt and padding rows cost nothing):
    the forward gathers them into a temporary, the backward gathers one token group at a time
    and scatters ``grad_hidden`` back; ignored rows get exactly zero gradient. Token statistics,
    when asked, are extra outputs without gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, logit_scale, softcap, ignore_index, backend, chunks, stats):
        kernels = backend_ops(backend)
        chunks = dict(chunks, **kernels.call_options())  # env-selected variants, fixed for the backward
        rows, h_c, y_c = labelled_rows(hidden, labels, ignore_index)
        logp_c, lse_c, values = run_forward(kernels, h_c, weight, y_c, bias, logit_scale, softcap, ignore_index,
                                            chunks, stats)
        del h_c  # the gathered copy is not kept for the backward
        ctx.save_for_backward(hidden, weight, bias, y_c, lse_c, rows)
        ctx.options = (logit_scale, softcap, ignore_index, backend, chunks)
        return scattered_outputs(ctx, logp_c, values, stats, rows, labels.shape)

    @staticmethod
    def backward(ctx, grad_logp, *_stat_grads):
        hidden, weight, bias, labels, lse, rows = ctx.saved_tensors
        logit_scale, softcap, ignore_index, backend, chunks = ctx.options
        needs = ctx.needs_input_grad[:3]
        grads = run_backward(backend_ops(backend), grad_logp, rows, hidden, weight, labels, lse, bias, logit_scale,
                             softcap, ignore_index, needs, chunks)
        return (*in_input_dtypes(grads, hidden, weight, bias, needs), None, None, None, None, None, None, None)


class TokenLogprobs(NamedTuple):
    """``linear_logprobs(..., stats=...)``: the log-probs and the requested statistics, each of
    ``labels.shape`` (fp32; fp64 for fp64 inputs), 0 where ignored, without gradient."""

    logp: torch.Tensor
    stats: dict


def linear_logprobs(hidden, weight, labels, *, bias=None, logit_scale=1.0, softcap=None,
                    ignore_index=-100, backend="auto", chunk_tokens=None, chunk_vocab=None, stats=(),
                    process_group=None, vocab_offset=None, check_finite=True):
    """Per-token log-probs of ``labels`` under ``softmax(cap(logit_scale * (hidden @ weight.T + bias)))``.

    hidden [..., D], weight [V, D], labels [...] (``ignore_index`` skipped) -> fp32 tensor of
    ``labels.shape`` (fp64 for fp64 inputs), 0 where ignored. Differentiable with respect to
    hidden, weight and bias; the ``[tokens, vocab]`` logits never exist, and ignored rows are
    not computed at all (their gradient is exactly 0). ``chunk_tokens`` and ``chunk_vocab``
    override the tile sizes: the chunked (torch) backend's tiles, or the Triton backend's token
    group and vocabulary chunk (defaults from ``UPO_GROUP_MB`` / ``UPO_TILE_MB``).

    ``stats``: names from ``TOKEN_STATS`` (``entropy``, ``log_sum_sq_probs``, ``mean_logits``,
    ``is_top1``: TRL's fused-head statistics, definitions in ``token_stats.py``), computed in the
    same pass over the logit tiles. With any, the result is ``TokenLogprobs(logp, {name: tensor})``;
    without, the log-probs tensor alone, computed exactly as before.

    A head sharded over the vocabulary (tensor parallelism, ``vocab_parallel.py``): ``weight``
    (and ``bias``) a ``Shard(0)`` DTensor on a 1-D device mesh, or this rank's rows of them as
    plain tensors with ``process_group`` and ``vocab_offset`` (the shard's first vocabulary id).
    Every rank of the group passes the same hidden states (plain, or a Replicate DTensor) and
    global label ids, and gets the same log-probs and statistics; the weight's gradient stays on
    its shard, hidden's is summed over the group.

    A NaN or inf log-prob raises ``upo_kernels.nonfinite.NonFiniteError`` (a ``ValueError``) naming ``hidden``,
    ``weight`` or ``bias``, whichever holds NaN or inf where a log-prob reads it (one reduction over the
    log-probs and one host sync; the inputs are scanned only then). ``check_finite=False`` leaves it to a
    caller that must first agree with other ranks (``upo.fused_loss`` with ``sequence_group``).
    """
    stats = token_stats.check_stats(stats)
    sharded = vocab_parallel.local_tensors(hidden, weight, bias, process_group, vocab_offset)
    if sharded is not None:
        hidden, weight, bias, process_group, vocab_offset = sharded
    hidden, weight, bias = autocast_operands(hidden, weight, bias)
    validate_linear_inputs(hidden, weight, labels, bias, logit_scale, softcap, ignore_index,
                           check_labels=sharded is None)
    backend = resolve_backend(backend, hidden.device)
    if backend == "triton" and hidden.dtype == torch.float64:
        raise TypeError("backend='triton' supports float32/bfloat16/float16 inputs, got float64 hidden")
    chunks = {}
    if chunk_tokens is not None:
        chunks["chunk_tokens"] = int(chunk_tokens)
    if chunk_vocab is not None:
        chunks["chunk_vocab"] = int(chunk_vocab)
    lead_shape = labels.shape
    h2 = hidden.reshape(-1, hidden.shape[-1])
    if h2.stride(-1) != 1:
        h2 = h2.contiguous()
    w = weight if weight.stride(-1) == 1 else weight.contiguous()
    y = labels.reshape(-1).to(torch.int64)
    # each Triton configuration's first call compared with the torch backend (first_use_check.py)
    backend = first_use_check.checked_backend(backend, h2, w, bias, y, float(logit_scale), softcap,
                                              int(ignore_index), stats)
    options = (float(logit_scale), None if softcap is None else float(softcap), int(ignore_index), backend, chunks,
               stats)
    if sharded is None:
        out = _LinearLogprobs.apply(h2, w, bias, y, *options)
    else:
        layout = vocab_parallel.gather_layout(process_group, vocab_offset, w.shape[0], y.numel(), h2.shape[1], y,
                                              int(ignore_index))
        check_label_range(y, layout.vocab, ignore_index)
        out = vocab_parallel.VocabParallelLogprobs.apply(h2, w, bias, y, layout, *options)
    if check_finite:
        check_finite_logprobs(out[0] if stats else out, h2, w, bias, y, ignore_index)
    if not stats:
        return out.reshape(lead_shape)
    return TokenLogprobs(out[0].reshape(lead_shape),
                         {name: v.reshape(lead_shape) for name, v in zip(stats, out[1:])})


class _LogprobsFromLogits(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, ignore_index, backend):
        if backend == "torch":
            logp, lse = chunked.logprobs_from_logits_forward(logits, labels, ignore_index)
        else:
            from upo_kernels import logprobs as triton_logprobs

            logp, lse = triton_logprobs.forward(logits, labels, ignore_index)
        ctx.save_for_backward(logits, labels, lse)
        ctx.options = (ignore_index, backend)
        return logp

    @staticmethod
    def backward(ctx, grad_logp):
        logits, labels, lse = ctx.saved_tensors
        ignore_index, backend = ctx.options
        if backend == "torch":
            grad = chunked.logprobs_from_logits_backward(grad_logp, logits, labels, lse, ignore_index)
        else:
            from upo_kernels import logprobs as triton_logprobs

            grad = triton_logprobs.backward(grad_logp.contiguous(), logits, labels, lse, ignore_index)
        return grad, None, None, None


def logprobs_from_logits(logits, labels, *, ignore_index=-100, backend="auto"):
    """Per-token log-probs from logits the caller already has: logits [..., V], labels [...]."""
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise TypeError("logits must be a floating-point torch.Tensor")
    if tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"labels shape {tuple(labels.shape)} must equal logits' leading shape "
                         f"{tuple(logits.shape[:-1])}")
    vocab = logits.shape[-1]
    kept = labels[labels != ignore_index]
    if kept.numel() and (int(kept.min()) < 0 or int(kept.max()) >= vocab):
        raise ValueError(f"labels must be in [0, {vocab}) or equal ignore_index={ignore_index}")
    backend = resolve_backend(backend, logits.device)
    z = logits.reshape(-1, vocab)
    z = z if z.stride(-1) == 1 else z.contiguous()
    logp = _LogprobsFromLogits.apply(z, labels.reshape(-1).to(torch.int64), int(ignore_index), backend)
    return logp.reshape(labels.shape)
