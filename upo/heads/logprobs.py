"""``upo.causal_lm_logprobs``: a causal LM's own next-token log-probs, without its ``[tokens, vocab]`` logits."""
from __future__ import annotations

import torch
from torch import nn

from upo.heads.check import check_lm_head
from upo.heads.describe import describe_lm_head
from upo_kernels import linear_logprobs


def causal_lm_logprobs(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor | None = None, *,
                       attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                       backend: str = "auto", check: bool = True) -> torch.Tensor:
    """``[B, T-1]``: ``log p(labels[:, t+1] | tokens <= t)``, 0 where the label is -100.

    Equal to ``log_softmax(model(input_ids).logits[:, :-1])`` gathered at ``labels[:, 1:]`` (labels
    default to ``input_ids``), computed from the LM head's input and weight by upo's kernels, so
    the logits never exist. Differentiable (run it under ``torch.no_grad()`` for a reference pass).
    ``model``: a transformers causal LM or a PEFT model around one; packed rows: ``position_ids``
    restarting per sequence and no ``attention_mask``. ``check``: the first call on a model compares
    the result with the model's own logits on a slice (see ``upo.heads.check_lm_head``).
    Raises ``upo.heads.UnsupportedModelError`` (a ``ValueError``) naming the model type when the
    model's logits are not reproducible this way.
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
        raise ValueError("input_ids must be an integer tensor [B, T]")
    labels = input_ids if labels is None else labels
    if not isinstance(labels, torch.Tensor) or tuple(labels.shape) != tuple(input_ids.shape):
        got = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"labels must have input_ids' shape {tuple(input_ids.shape)}, got {got}")
    if input_ids.shape[1] < 2:
        raise ValueError("input_ids needs at least 2 tokens per row (the first token has no log-prob)")
    head = describe_lm_head(model)
    if check and not head.checked:
        check_lm_head(model, input_ids, attention_mask, backend=backend)
    hidden = head.hidden_states(model, input_ids, attention_mask, position_ids)
    weight, bias = head.weight_and_bias(hidden.dtype)
    return linear_logprobs(hidden[:, :-1], weight, labels[:, 1:], bias=bias, backend=backend, **head.logit_options)
