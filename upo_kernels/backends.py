"""The two implementations of the fused linear log-prob contract, by name, and what both
autograd Functions (``functional.py``, ``vocab_parallel.py``) do around them.

``forward(hidden, weight, labels, ...) -> (logp, lse[, stats])`` and
``backward(grad_logp, hidden, weight, labels, lse, ...) -> (grad_h, grad_w, grad_b)``:
``chunked.py`` (``"torch"``, any device) and ``triton_ops.py`` (``"triton"``). Only the rows with
a label run through them: the forward gathers those rows (``labelled_rows``) and scatters the
results back (``scatter_rows``), the backward hands the backend the row indices instead.
"""
from __future__ import annotations

import contextlib

import torch

from upo_kernels import chunked


class TorchOps:
    forward = staticmethod(chunked.linear_logprobs_forward)
    backward = staticmethod(chunked.linear_logprobs_backward)

    @staticmethod
    def call_options():
        return {}


def ops(backend: str):
    if backend == "torch":
        return TorchOps
    from upo_kernels import triton_ops  # imported lazily: triton may be absent on CPU-only installs

    return triton_ops


def labelled_rows(hidden, labels, ignore_index):
    """``(rows, hidden rows, their labels)``: the rows whose label is not ``ignore_index`` (one host
    sync), gathered; ``rows`` is None, and nothing is copied, when every row has a label."""
    rows = (labels != ignore_index).nonzero().squeeze(1)
    if rows.numel() == labels.numel():
        return None, hidden, labels
    return rows, hidden.index_select(0, rows), labels.index_select(0, rows)


def scatter_rows(values, rows, shape):
    """Per-row results of the labelled rows -> ``shape``, 0 at the other rows."""
    return values if rows is None else values.new_zeros(shape).index_copy_(0, rows, values)


def scattered_outputs(ctx, logp, values, stats, rows, shape):
    """An autograd Function's outputs: the log-probs of ``shape`` alone, or with the statistics in
    ``stats`` order (marked non-differentiable)."""
    logp = scatter_rows(logp, rows, shape)
    if not stats:
        return logp
    values = [scatter_rows(values[name], rows, shape) for name in stats]
    ctx.mark_non_differentiable(*values)
    return (logp, *values)


def run_forward(kernels, hidden, weight, labels, bias, logit_scale, softcap, ignore_index, chunks, stats):
    """``kernels.forward`` (with autocast off: :func:`autocast_off`) -> ``(logp, lse, {name: values})`` (no
    statistics: an empty dict)."""
    with autocast_off(hidden.device):
        if stats:
            return kernels.forward(hidden, weight, labels, bias, logit_scale, softcap, ignore_index, stats=stats,
                                   **chunks)
        logp, lse = kernels.forward(hidden, weight, labels, bias, logit_scale, softcap, ignore_index, **chunks)
    return logp, lse, {}


def run_backward(kernels, grad_logp, rows, hidden, weight, labels, lse, bias, logit_scale, softcap, ignore_index,
                 needs, chunks):
    """``kernels.backward`` (with autocast off) for the labelled ``rows`` of ``grad_logp`` (``needs``: whether
    hidden, weight and bias want a gradient) -> ``(grad_h, grad_w, grad_b)`` in the backend's dtypes."""
    need_h, need_w, need_b = needs
    grad_c = grad_logp if rows is None else grad_logp.index_select(0, rows)
    with autocast_off(hidden.device):
        return kernels.backward(grad_c.contiguous(), hidden, weight, labels, lse, bias, logit_scale, softcap,
                                ignore_index, needs_weight_grad=need_w, needs_bias_grad=need_b,
                                needs_hidden_grad=need_h, rows=rows, **chunks)


def in_input_dtypes(grads, hidden, weight, bias, needs):
    """``(grad_h, grad_w, grad_b)`` cast to their inputs' dtypes; None where not needed."""
    grad_h, grad_w, grad_b = grads
    need_h, need_w, need_b = needs
    return (grad_h.to(hidden.dtype) if need_h else None,
            grad_w.to(weight.dtype) if (need_w and grad_w is not None) else None,
            grad_b.to(bias.dtype) if (need_b and grad_b is not None) else None)


def autocast_operands(hidden, weight, bias):
    """``(hidden, weight, bias)`` as the model's own ``F.linear`` head would multiply them: under
    autocast on their device, floating operands other than fp64 cast to autocast's dtype (a
    differentiable cast); otherwise unchanged. The one dtype rule of every log-prob
    (docs/kernels.md, "Mixed precision")."""
    if not isinstance(hidden, torch.Tensor) or not hidden.is_floating_point() or hidden.dtype == torch.float64:
        return hidden, weight, bias
    device_type = hidden.device.type
    if not torch.amp.is_autocast_available(device_type) or not torch.is_autocast_enabled(device_type):
        return hidden, weight, bias  # (a meta tensor has no autocast: the input checks name it)
    dtype = torch.get_autocast_dtype(device_type)

    def cast(t):
        return t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != dtype else t

    return cast(hidden), cast(weight), cast(bias)


def autocast_off(device: torch.device):
    """The kernels' own context: their fp32 accumulation is not autocast's to change (a logit tile
    ``mm`` under autocast would be bf16), in the forward and in the backward alike."""
    if not torch.amp.is_autocast_available(device.type):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, enabled=False)
