"""upo_kernels: tensors in, tensors out. Fused linear log-prob kernels and their autograd wrappers.

``linear_logprobs(hidden, weight, labels, ...)`` returns per-token log-probs of ``labels``
under ``softmax(logit_scale * (hidden @ weight.T + bias))`` (optionally soft-capped) without
materialising the ``[tokens, vocab]`` logits. Backends: ``"triton"`` (CUDA, or CPU under
``TRITON_INTERPRET=1``), ``"torch"`` (chunked pure PyTorch, any device), ``"auto"``.
``linear_logprobs(..., stats=("entropy", "is_top1", ...))`` also returns TRL's per-token
statistics (``TOKEN_STATS``) from the same pass, as ``TokenLogprobs(logp, {name: tensor})``.
An LM head sharded over the vocabulary (a ``Shard(0)`` DTensor, or a local shard with
``process_group`` and ``vocab_offset``) runs on each rank's shard (``vocab_parallel.py``).
"""
from upo_kernels.functional import TOKEN_STATS, TokenLogprobs, linear_logprobs, logprobs_from_logits

__all__ = ["TOKEN_STATS", "TokenLogprobs", "linear_logprobs", "logprobs_from_logits"]
