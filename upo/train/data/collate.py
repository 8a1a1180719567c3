"""Batches of pairs for the model: ``B`` chosen sequences then ``B`` rejected ones, padded or packed.

Labels are already aligned with the hidden states (position ``t`` predicts ``labels[t]``),
which is what :func:`upo.fused_loss` expects.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from upo.train.data.pairs import PreferenceExample

IGNORE_INDEX = -100


@dataclass
class PreferenceBatch:
    """Model inputs for ``B`` pairs: rows (or packed sequences) ``0..B-1`` chosen, ``B..2B-1`` rejected.

    Padded: ``input_ids``/``attention_mask``/``labels`` are ``[2B, T]``. Packed: ``input_ids`` and
    ``position_ids`` are ``[1, N]``, ``labels`` is ``[N]`` and ``cu_seqlens`` is int32 ``[2B+1]``.
    ``prompt_last_index`` locates each pair's last prompt token in the chosen sequence
    (``[B]`` row positions when padded, flat positions when packed).
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    prompt_last_index: torch.Tensor
    attention_mask: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None
    cu_seqlens: torch.Tensor | None = None
    aux_chosen: torch.Tensor | None = None  # [B, K]
    aux_rejected: torch.Tensor | None = None
    ref_chosen_logps: torch.Tensor | None = None  # [B], when precomputed
    ref_rejected_logps: torch.Tensor | None = None
    ref_chosen_shared_logps: torch.Tensor | None = None  # [B], LD-DPO's shared-prefix sums, when precomputed
    ref_rejected_shared_logps: torch.Tensor | None = None
    example_indices: list[int] = field(default_factory=list)
    num_tokens: int = 0

    @property
    def num_pairs(self) -> int:
        return len(self.example_indices)

    @property
    def packed(self) -> bool:
        return self.cu_seqlens is not None

    def to(self, device) -> "PreferenceBatch":
        moved = {name: (value.to(device) if isinstance(value, torch.Tensor) else value)
                 for name, value in self.__dict__.items()}
        return PreferenceBatch(**moved)


def _sequences(examples: Sequence[PreferenceExample]) -> list[tuple[list[int], int]]:
    """(token ids, prompt length) for all chosen sequences, then all rejected ones."""
    chosen = [(e.prompt_ids + e.chosen_ids, len(e.prompt_ids)) for e in examples]
    rejected = [(e.prompt_ids + e.rejected_ids, len(e.prompt_ids)) for e in examples]
    return chosen + rejected


def _shifted_labels(ids: list[int], prompt_len: int) -> list[int]:
    """Position ``t`` predicts ``ids[t+1]`` for response tokens; prompt and last position ignored."""
    return [IGNORE_INDEX] * (prompt_len - 1) + ids[prompt_len:] + [IGNORE_INDEX]


def _aux_and_ref(examples, ref_logps) -> dict:
    extra: dict[str, Any] = {}
    if examples and examples[0].aux_chosen:
        extra["aux_chosen"] = torch.tensor([e.aux_chosen for e in examples], dtype=torch.float32)
        extra["aux_rejected"] = torch.tensor([e.aux_rejected for e in examples], dtype=torch.float32)
    if ref_logps is not None:
        idx = torch.tensor([e.index for e in examples], dtype=torch.long)
        extra["ref_chosen_logps"] = ref_logps["chosen"][idx].float()
        extra["ref_rejected_logps"] = ref_logps["rejected"][idx].float()
        if "chosen_shared" in ref_logps:  # cached with --ld-alpha
            extra["ref_chosen_shared_logps"] = ref_logps["chosen_shared"][idx].float()
            extra["ref_rejected_shared_logps"] = ref_logps["rejected_shared"][idx].float()
    return extra


def collate_padded(examples: Sequence[PreferenceExample], pad_id: int, ref_logps: dict | None = None,
                   pad_to_multiple_of: int = 1) -> PreferenceBatch:
    """Right-padded ``[2B, T]`` batch (right padding keeps real tokens at the same positions)."""
    seqs = _sequences(examples)
    width = max(len(ids) for ids, _ in seqs)
    width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    labels = torch.full((len(seqs), width), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, prompt_len) in enumerate(seqs):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        attention_mask[row, :len(ids)] = 1
        labels[row, :len(ids)] = torch.tensor(_shifted_labels(ids, prompt_len))
    prompt_last = torch.tensor([len(e.prompt_ids) - 1 for e in examples], dtype=torch.long)
    return PreferenceBatch(
        input_ids=input_ids, labels=labels, prompt_last_index=prompt_last, attention_mask=attention_mask,
        example_indices=[e.index for e in examples], num_tokens=int(attention_mask.sum()),
        **_aux_and_ref(examples, ref_logps),
    )


def collate_packed(examples: Sequence[PreferenceExample], ref_logps: dict | None = None) -> PreferenceBatch:
    """Padding-free batch: all ``2B`` sequences concatenated in one row, positions reset per sequence.

    Transformers turns the restarting ``position_ids`` (with no attention mask) into a
    block-diagonal causal mask for SDPA/eager and into varlen calls for flash-attention.
    """
    seqs = _sequences(examples)
    ids_flat, labels_flat, positions, bounds = [], [], [], [0]
    for ids, prompt_len in seqs:
        ids_flat += ids
        labels_flat += _shifted_labels(ids, prompt_len)
        positions += range(len(ids))
        bounds.append(bounds[-1] + len(ids))
    prompt_last = torch.tensor([bounds[b] + len(e.prompt_ids) - 1 for b, e in enumerate(examples)],
                               dtype=torch.long)
    return PreferenceBatch(
        input_ids=torch.tensor([ids_flat], dtype=torch.long),
        labels=torch.tensor(labels_flat, dtype=torch.long),
        prompt_last_index=prompt_last,
        position_ids=torch.tensor([positions], dtype=torch.long),
        cu_seqlens=torch.tensor(bounds, dtype=torch.int32),
        example_indices=[e.index for e in examples], num_tokens=len(ids_flat),
        **_aux_and_ref(examples, ref_logps),
    )


def collate(examples: Sequence[PreferenceExample], pad_id: int, packing: bool,
            ref_logps: dict | None = None) -> PreferenceBatch:
    return collate_packed(examples, ref_logps) if packing else collate_padded(examples, pad_id, ref_logps)
