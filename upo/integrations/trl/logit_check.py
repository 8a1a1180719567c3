"""``UPOTrainer``'s start-up check: upo's logit-free log-probs equal the models' own (``upo.heads``).

At construction, before any step, the policy and a given ``ref_model`` are read once
(``upo.heads.describe_lm_head``) and compared with their own ``log_softmax(logits)`` on the first
training example (its chosen and rejected sequences, 16 tokens each). A disagreement raises
``upo.heads.LogitCheckError`` (a ``ValueError``) naming the model type and the size;
``UPOConfig(logit_check=False)`` skips the comparison.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from upo.heads import LogitCheckError, check_lm_head, describe_lm_head
from upo.integrations.trl.forward import causal_lm_of


def first_pair(dataset, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(input_ids, attention_mask)`` ``[2, T]``: prompt + chosen and prompt + rejected of the first prepared
    example (right-padded), or None when the dataset has no such example."""
    try:
        example = next(iter(dataset))
        rows = [list(example["prompt_ids"]) + list(example[key]) for key in ("chosen_ids", "rejected_ids")]
    except (StopIteration, KeyError, TypeError):
        return None
    length = max(len(row) for row in rows)
    ids = torch.tensor([row + [row[0]] * (length - len(row)) for row in rows], device=device)
    mask = torch.tensor([[1] * len(row) + [0] * (length - len(row)) for row in rows], device=device)
    return ids, mask


def check_models(model: nn.Module, ref_model: nn.Module | None, dataset, backend: str,
                 autocast=contextlib.nullcontext) -> None:
    """Describe and check the policy (and ``ref_model``); raises ``LogitCheckError`` naming the setting.
    ``autocast()``: the trainer's mixed precision, which accelerate has already wrapped around a prepared
    ``ref_model``'s forward: both sides of the comparison run under it."""
    for name, candidate in (("model", model), ("ref_model", ref_model)):
        if candidate is None:
            continue
        causal_lm = causal_lm_of(candidate)
        weight, _ = describe_lm_head(causal_lm).weight_and_bias()  # an UnsupportedModelError names the type
        pair = first_pair(dataset, weight.device) if dataset is not None else None
        if pair is None:  # no prepared example: any tokens will do
            ids = torch.arange(32, device=weight.device).remainder(weight.shape[0]).reshape(2, 16)
            pair = ids, torch.ones_like(ids)
        try:
            with autocast():
                check_lm_head(causal_lm, *pair, backend=backend)
        except LogitCheckError as err:
            raise LogitCheckError(err.model_type, err.max_error, err.tolerance,
                                  f"; {name}, on the first training example; UPOConfig(logit_check=False) "
                                  "skips the check") from None
