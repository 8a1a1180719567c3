"""TRL's preference batch read for upo's kernels, and the collator that keeps the aux reward columns.

TRL's ``DataCollatorForPreference`` gives ``input_ids``, ``attention_mask`` and
``completion_mask``, each ``(2B, T)`` with the B chosen sequences first, and with
``precompute_ref_log_probs`` the ``(B,)`` ``ref_chosen_logps`` / ``ref_rejected_logps``.
"""
from __future__ import annotations

from typing import Any

import torch

from upo.integrations.trl.rewards import AUX_COLUMNS

IGNORE_INDEX = -100


def next_token_labels(input_ids: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """``(2B, T)`` labels aligned with the hidden states: position t predicts token t+1.

    ``-100`` where token t+1 is prompt or padding, and at the last position.
    """
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, :-1] = input_ids[:, 1:].masked_fill(completion_mask[:, 1:] == 0, IGNORE_INDEX)
    return labels


def last_prompt_index(completion_mask: torch.Tensor) -> torch.Tensor:
    """``(B,)`` position of each pair's last prompt token, read on the chosen rows.

    Chosen and rejected share the prompt, so one position serves the pair.
    """
    chosen = completion_mask[: completion_mask.shape[0] // 2]
    first_completion = chosen.to(torch.int64).argmax(dim=1)
    return (first_completion - 1).clamp(min=0)


def aux_rewards(inputs: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The batch's ``aux_rewards_chosen`` / ``aux_rewards_rejected`` ``(B, K)``, if it has them."""
    return {name: inputs[name] for name in AUX_COLUMNS if name in inputs}


class AuxRewardCollator:
    """A preference collator that also stacks the examples' aux reward columns into ``(B, K)`` tensors.

    TRL's collator drops every key it does not know; this one calls it, then adds the two columns.
    """

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, examples: list[dict[str, Any]], *args, **kwargs) -> dict[str, Any]:
        batch = self.collator(examples, *args, **kwargs)
        for name in AUX_COLUMNS:
            if name in examples[0]:
                batch[name] = torch.tensor([example[name] for example in examples], dtype=torch.float32)
        return batch

    def __getattr__(self, name: str):
        # tokenizer, pad_token_id, ... of the wrapped collator (Trainer reads some)
        if name == "collator":
            raise AttributeError(name)
        return getattr(self.collator, name)
