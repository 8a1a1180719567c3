"""What the policy's backbone gives a batch: the hidden states its LM head consumes, and each prompt's last
(the value head's input). Read by the module DDP wraps (``preference_model.py``), KTO's mismatched and unpaired
rows (``kto_pairs.py``) and the reference cache (``reference.py``) alike."""
from __future__ import annotations

import torch
from torch import nn

from upo.context_parallel import ContextParallelRows
from upo.heads import LMHead, describe_lm_head
from upo.shared_prompt import context_hidden_states, shared_hidden_states
from upo.train.data import PreferenceBatch


def head_inputs(causal_lm: nn.Module, batch, context: ContextParallelRows | None = None
                ) -> tuple[LMHead, torch.Tensor]:
    """The model's head description and the hidden states its head consumes: ``[2B, T, D]`` padded,
    ``[N, D]`` packed; a batch with shared prompt rows runs those and is gathered back to ``[2B, T, D]``.
    With ``context`` (this rank's part of the batch under context parallelism): this rank's chunks of the model
    rows, ``[rows, L/N, D]`` (``context.loss_hidden`` packs their labelled tokens)."""
    head = describe_lm_head(causal_lm)
    if context is not None:
        return head, context_hidden_states(head, causal_lm, context)
    if getattr(batch, "shared", None) is not None:
        return head, shared_hidden_states(head, causal_lm, batch.shared)
    hidden = head.hidden_states(causal_lm, batch.input_ids, batch.attention_mask, batch.position_ids)
    return head, hidden[0] if batch.packed else hidden


def prompt_hidden(hidden: torch.Tensor, batch: PreferenceBatch) -> torch.Tensor:
    """``[B, D]``: each pair's hidden state at its last prompt token (chosen sequence)."""
    if batch.packed:
        return hidden[batch.prompt_last_index]
    rows = torch.arange(batch.prompt_last_index.numel(), device=hidden.device)
    return hidden[rows, batch.prompt_last_index]
