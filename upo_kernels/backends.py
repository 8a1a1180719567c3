"""The two implementations of the fused linear log-prob contract, by name.

``forward(hidden, weight, labels, ...) -> (logp, lse[, stats])`` and
``backward(grad_logp, hidden, weight, labels, lse, ...) -> (grad_h, grad_w, grad_b)``:
``chunked.py`` (``"torch"``, any device) and ``triton_ops.py`` (``"triton"``).
"""
from __future__ import annotations

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
