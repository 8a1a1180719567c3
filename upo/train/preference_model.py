"""The module that computes the loss from a batch: the unit DDP/FSDP wrap.

One step runs the policy's own forward with its LM head stubbed out (``upo.heads``) once over the
chosen and rejected sequences together, and hands the hidden states the head would have received,
with the head's weight, bias and logit options, to :func:`upo.fused_loss`, so ``[tokens, vocab]``
logits never exist. The reference is a frozen copy of the initial policy, ``--ref-model``, the
policy with LoRA adapters disabled, or precomputed log-probs.
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

import upo
from upo.heads import LMHead
from upo.train.data import PreferenceBatch, UnpairedBatch
from upo.train.hidden_states import head_inputs, prompt_hidden
from upo.train.kto_pairs import mismatched_kwargs, unpaired_forward


class PreferenceModel(nn.Module):
    """Policy (+ optional value head) whose ``forward(batch)`` returns :class:`upo.LossOutput`.

    The whole loss lives inside ``forward`` so that DDP's and FSDP's hooks see every use of the
    parameters, the LM head's included. The reference model is deliberately *not* a submodule:
    it is frozen, must not be synchronised, sharded, optimised or saved.
    """

    def __init__(self, policy: nn.Module, value_head: nn.Module | None, reference: nn.Module | str | None,
                 loss_kwargs: dict, backend: str, autocast_dtype: torch.dtype | None = None, split=None):
        super().__init__()
        # --cp: a SequenceSplit (context_parallel.py) giving this rank's part of each batch; None: whole sequences
        self.__dict__["split"] = split
        self.policy = policy
        self.value_head = value_head
        # A frozen model, "adapters" (LoRA disabled), "precomputed" (in the batch) or None;
        # a plain attribute, hidden from nn.Module bookkeeping.
        self.__dict__["reference"] = reference
        self.loss_kwargs = loss_kwargs
        self.backend = backend
        self.autocast_dtype = autocast_dtype

    def _autocast(self, device: torch.device):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.autocast_dtype)

    def forward(self, batch: PreferenceBatch):
        device = batch.input_ids.device
        with self._autocast(device):
            context = self.split.rows(batch) if self.split is not None else None
            head, hidden = head_inputs(self.policy, batch, context)
            weight, bias = head.weight_and_bias(hidden.dtype)
            local_hidden, hidden = hidden, hidden if context is None else context.loss_hidden(hidden)
            if isinstance(batch, UnpairedBatch):
                return unpaired_forward(self, batch, hidden, weight, bias, head.logit_options)
            kwargs = dict(self.loss_kwargs)
            kwargs.update(self._reference_kwargs(batch, head, context))
            kwargs.update(self._aux_kwargs(batch, local_hidden, context))
            kwargs.update(mismatched_kwargs(self, batch))  # KTO's reference point
            if context is None:
                layout = {"labels": batch.labels, "cu_seqlens": batch.cu_seqlens}
            else:  # this rank's labelled tokens, packed; their sums reduced over the split's ranks
                layout = {"labels": context.labels, "cu_seqlens": context.cu_seqlens,
                          "sequence_group": context.group}
            # token_stats: TRL's entropy / mean_token_accuracy / logits/* metrics, from the same pass
            return upo.fused_loss(hidden, weight, bias=bias, backend=self.backend, token_stats=True, **layout,
                                  **head.logit_options, **kwargs)

    def _reference_kwargs(self, batch: PreferenceBatch, policy_head: LMHead, context=None) -> dict:
        if self.reference is None:
            return {}
        if self.reference == "precomputed":
            given = {"ref_chosen_logps": batch.ref_chosen_logps, "ref_rejected_logps": batch.ref_rejected_logps}
            if "ld_alpha" in self.loss_kwargs:
                given.update(ref_chosen_shared_logps=batch.ref_chosen_shared_logps,
                             ref_rejected_shared_logps=batch.ref_rejected_shared_logps)
            return given
        with torch.no_grad():
            adapters_off = self.policy.disable_adapter() if self.reference == "adapters" else contextlib.nullcontext()
            with adapters_off:  # the head's weight too is read with the adapters off (LoRA on the head)
                model = self.policy if self.reference == "adapters" else self.reference
                head, ref_hidden = head_inputs(model, batch, context)
                if context is not None:
                    ref_hidden = context.loss_hidden(ref_hidden)
                ref_weight, ref_bias = head.weight_and_bias_for(policy_head.logit_options, ref_hidden.dtype)
        return {"ref_hidden": ref_hidden, "ref_weight": ref_weight.detach(),
                "ref_bias": None if ref_bias is None else ref_bias.detach()}

    def _aux_kwargs(self, batch: PreferenceBatch, hidden: torch.Tensor, context=None) -> dict:
        kwargs: dict[str, Any] = {}
        if batch.aux_chosen is not None:
            kwargs["aux_rewards_chosen"] = batch.aux_chosen
            kwargs["aux_rewards_rejected"] = batch.aux_rejected
        if self.value_head is not None:
            if context is None:
                values = self.value_head(prompt_hidden(hidden, batch).detach().float()).float()
            else:  # the prompt position lives on one rank, which alone keeps the value's gradient
                values = context.owned_values(self.value_head(context.prompt_hidden(hidden).float()).float())
            kwargs["values_chosen"] = values
            kwargs["values_rejected"] = values  # same prompt, same baseline
        return kwargs
