"""upo_kernels: tensors in, tensors out. Fused linear log-prob kernels and their autograd wrappers.

``linear_logprobs(hidden, weight, labels, ...)`` returns per-token log-probs of ``labels``
under ``softmax(logit_scale * (hidden @ weight.T + bias))`` (optionally soft-capped) without
materialising the ``[tokens, vocab]`` logits. Backends: ``"triton"`` (CUDA, or CPU under
``TRITON_INTERPRET=1``), ``"torch"`` (chunked pure PyTorch, any device), ``"auto"``.
"""
from upo_kernels.functional import linear_logprobs, logprobs_from_logits

__all__ = ["linear_logprobs", "logprobs_from_logits"]
