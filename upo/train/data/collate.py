"""Batches for the model: ``B`` chosen sequences then ``B`` rejected ones (pairs), or ``N`` completions
(unpaired rows, ``unpaired.py``), padded or packed; with KTO, the mismatched prompt/completion rows
of its reference point.

Labels are already aligned with the hidden states (position ``t`` predicts ``labels[t]``),
which is what :func:`upo.fused_loss` expects.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from upo.shared_prompt import SharedPromptRows, share_prompt_rows
from upo.train.data.pairs import PreferenceExample
from upo.train.data.unpaired import UnpairedExample

IGNORE_INDEX = -100
Sequences = list[tuple[list[int], int]]  # (token ids, prompt length) per row


class _Movable:
    """Rows that move to a device together; packed when they carry ``cu_seqlens``."""

    cu_seqlens: torch.Tensor | None

    def to(self, device):
        moved = {name: (value.to(device) if isinstance(value, (torch.Tensor, _Movable, SharedPromptRows)) else value)
                 for name, value in self.__dict__.items()}
        return type(self)(**moved)

    @property
    def packed(self) -> bool:
        return self.cu_seqlens is not None


class _Batch(_Movable):
    """A batch of examples (pairs or unpaired rows), ``example_indices`` naming them."""

    example_indices: list[int]

    @property
    def num_examples(self) -> int:
        return len(self.example_indices)


@dataclass
class SequenceRows(_Movable):
    """Token rows for the backbone: padded ``[R, T]`` (``attention_mask``), or packed ``[1, N]`` with
    ``position_ids`` restarting per sequence and int32 ``cu_seqlens`` ``[R+1]`` (``labels`` ``[N]``)."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None
    cu_seqlens: torch.Tensor | None = None
    num_tokens: int = 0

    def last_prompt_positions(self, prompt_lengths: Sequence[int]) -> torch.Tensor:
        """The last prompt token of the first ``len(prompt_lengths)`` rows: row positions (padded) or flat
        positions (packed)."""
        lengths = torch.tensor(list(prompt_lengths), dtype=torch.long)
        if self.packed:
            return self.cu_seqlens[:len(lengths)].long() + lengths - 1
        return lengths - 1


def _shifted_labels(ids: list[int], prompt_len: int) -> list[int]:
    """Position ``t`` predicts ``ids[t+1]`` for response tokens; prompt and last position ignored."""
    return [IGNORE_INDEX] * (prompt_len - 1) + ids[prompt_len:] + [IGNORE_INDEX]


def pad_rows(seqs: Sequences, pad_id: int, pad_to_multiple_of: int = 1) -> SequenceRows:
    """Right-padded ``[R, T]`` rows (right padding keeps real tokens at the same positions)."""
    width = max(len(ids) for ids, _ in seqs)
    width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    labels = torch.full((len(seqs), width), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, prompt_len) in enumerate(seqs):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        attention_mask[row, :len(ids)] = 1
        labels[row, :len(ids)] = torch.tensor(_shifted_labels(ids, prompt_len))
    return SequenceRows(input_ids, labels, attention_mask=attention_mask, num_tokens=int(attention_mask.sum()))


def pack_rows(seqs: Sequences) -> SequenceRows:
    """Padding-free rows: all sequences concatenated in one row, positions reset per sequence.

    Transformers turns the restarting ``position_ids`` (with no attention mask) into a
    block-diagonal causal mask for SDPA/eager and into varlen calls for flash-attention.
    """
    ids_flat, labels_flat, positions, bounds = [], [], [], [0]
    for ids, prompt_len in seqs:
        ids_flat += ids
        labels_flat += _shifted_labels(ids, prompt_len)
        positions += range(len(ids))
        bounds.append(bounds[-1] + len(ids))
    return SequenceRows(torch.tensor([ids_flat], dtype=torch.long), torch.tensor(labels_flat, dtype=torch.long),
                        position_ids=torch.tensor([positions], dtype=torch.long),
                        cu_seqlens=torch.tensor(bounds, dtype=torch.int32), num_tokens=len(ids_flat))


def rows_of(seqs: Sequences, pad_id: int, packing: bool) -> SequenceRows:
    return pack_rows(seqs) if packing else pad_rows(seqs, pad_id)


def mismatched_sequences(prompts: list[list[int]], responses: list[list[int]], max_length: int | None,
                         ) -> tuple[Sequences, list[int]]:
    """KTO's mismatched pairs, as TRL builds them: row ``i`` is prompt ``i`` with response ``i - 1`` (rotated by
    one within the micro-batch), the response cut to what ``max_length`` leaves after the prompt. Returns the
    rows and, per row, the index of the response it took."""
    count = len(prompts)
    taken = [(i - 1) % count for i in range(count)]
    seqs = []
    for prompt, source in zip(prompts, taken):
        room = len(responses[source]) if max_length is None else max(1, max_length - len(prompt))
        seqs.append((prompt + responses[source][:room], len(prompt)))
    return seqs, taken


@dataclass
class PreferenceBatch(_Batch):
    """Model inputs for ``B`` pairs: rows (or packed sequences) ``0..B-1`` chosen, ``B..2B-1`` rejected.

    Padded: ``input_ids``/``attention_mask``/``labels`` are ``[2B, T]``. Packed: ``input_ids`` and
    ``position_ids`` are ``[1, N]``, ``labels`` is ``[N]`` and ``cu_seqlens`` is int32 ``[2B+1]``.
    ``prompt_last_index`` locates each pair's last prompt token in the chosen sequence
    (``[B]`` row positions when padded, flat positions when packed). ``kl``: KTO's ``2B`` mismatched
    rows (response ``k - 1`` of the ``2B`` after prompt ``k``), with ``ref_kl_logps`` when precomputed.
    ``shared`` (``--share-prompt``, padded only): the ``B`` rows ``[prompt, chosen, rejected]`` the model runs;
    the fields above keep the unshared layout its hidden states are gathered back into.
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
    kl: SequenceRows | None = None
    ref_kl_logps: torch.Tensor | None = None
    shared: SharedPromptRows | None = None

    @property
    def num_pairs(self) -> int:
        return len(self.example_indices)


def _sequences(examples: Sequence[PreferenceExample]) -> Sequences:
    """(token ids, prompt length) for all chosen sequences, then all rejected ones."""
    chosen = [(e.prompt_ids + e.chosen_ids, len(e.prompt_ids)) for e in examples]
    rejected = [(e.prompt_ids + e.rejected_ids, len(e.prompt_ids)) for e in examples]
    return chosen + rejected


def kl_keys(examples: Sequence, max_length: int | None) -> tuple[Sequences, list[tuple[int, int, str]]]:
    """The mismatched rows of a micro-batch (pairs or unpaired rows) and each row's key
    ``(prompt example, response example, side)``, which the reference cache is indexed by."""
    entries = [(e, side, ids) for side in examples[0].responses for e in examples for ids in [e.responses[side]]]
    seqs, taken = mismatched_sequences([e.prompt_ids for e, _, _ in entries], [ids for _, _, ids in entries],
                                       max_length)
    keys = [(entries[k][0].index, entries[j][0].index, entries[j][1]) for k, j in enumerate(taken)]
    return seqs, keys


def kl_fields(examples: Sequence, pad_id: int, packing: bool, ref_logps: dict | None, max_length: int | None) -> dict:
    """``kl`` (and ``ref_kl_logps`` from the cache's ``"kl"`` table) of a batch."""
    seqs, keys = kl_keys(examples, max_length)
    extra: dict[str, Any] = {"kl": rows_of(seqs, pad_id, packing)}
    if ref_logps is not None:
        table = ref_logps["kl"]
        extra["ref_kl_logps"] = torch.tensor([table[key] for key in keys], dtype=torch.float32)
    return extra


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


def _batch(examples, rows: SequenceRows, ref_logps, kl_extra) -> PreferenceBatch:
    return PreferenceBatch(
        input_ids=rows.input_ids, labels=rows.labels,
        prompt_last_index=rows.last_prompt_positions([len(e.prompt_ids) for e in examples]),
        attention_mask=rows.attention_mask, position_ids=rows.position_ids, cu_seqlens=rows.cu_seqlens,
        example_indices=[e.index for e in examples], num_tokens=rows.num_tokens,
        **_aux_and_ref(examples, ref_logps), **kl_extra,
    )


def collate_padded(examples: Sequence[PreferenceExample], pad_id: int, ref_logps: dict | None = None,
                   pad_to_multiple_of: int = 1) -> PreferenceBatch:
    """Right-padded ``[2B, T]`` batch."""
    return _batch(examples, pad_rows(_sequences(examples), pad_id, pad_to_multiple_of), ref_logps, {})


def collate_packed(examples: Sequence[PreferenceExample], ref_logps: dict | None = None) -> PreferenceBatch:
    """Padding-free batch: all ``2B`` sequences concatenated in one row, positions reset per sequence."""
    return _batch(examples, pack_rows(_sequences(examples)), ref_logps, {})


@dataclass
class UnpairedBatch(_Batch):
    """Model inputs for ``N`` unpaired rows (one sequence each, padded ``[N, T]`` or packed ``[1, T]``),
    ``desirable`` ``[N]`` their labels; ``kl``: KTO's ``N`` mismatched rows (``ref_kl_logps`` when cached)."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    prompt_last_index: torch.Tensor
    desirable: torch.Tensor
    attention_mask: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None
    cu_seqlens: torch.Tensor | None = None
    aux: torch.Tensor | None = None  # [N, K]
    ref_logps: torch.Tensor | None = None  # [N], when precomputed
    kl: SequenceRows | None = None
    ref_kl_logps: torch.Tensor | None = None
    example_indices: list[int] = field(default_factory=list)
    num_tokens: int = 0


def collate_unpaired(examples: Sequence[UnpairedExample], pad_id: int, packing: bool, ref_logps: dict | None,
                     kl_extra: dict) -> UnpairedBatch:
    """The batch of ``N`` unpaired rows, one sequence each (``kl_extra``: KTO's mismatched rows)."""
    rows = rows_of([(e.prompt_ids + e.completion_ids, len(e.prompt_ids)) for e in examples], pad_id, packing)
    extra: dict[str, Any] = dict(kl_extra)
    if examples[0].aux:
        extra["aux"] = torch.tensor([e.aux for e in examples], dtype=torch.float32)
    if ref_logps is not None:
        extra["ref_logps"] = ref_logps["completion"][torch.tensor([e.index for e in examples])].float()
    return UnpairedBatch(
        input_ids=rows.input_ids, labels=rows.labels,
        prompt_last_index=rows.last_prompt_positions([len(e.prompt_ids) for e in examples]),
        desirable=torch.tensor([e.label for e in examples], dtype=torch.bool),
        attention_mask=rows.attention_mask, position_ids=rows.position_ids, cu_seqlens=rows.cu_seqlens,
        example_indices=[e.index for e in examples], num_tokens=rows.num_tokens, **extra,
    )


def collate(examples: Sequence, pad_id: int, packing: bool, ref_logps: dict | None = None, *,
            kl: bool = False, max_length: int | None = None, share_prompt: bool = False):
    """The batch of these examples: a :class:`PreferenceBatch` of pairs, or an ``UnpairedBatch`` of
    unpaired rows; ``kl``: with KTO's mismatched rows (their completions cut to ``max_length``, never
    shared: each is a prompt with another pair's response); ``share_prompt``: pairs as shared rows."""
    kl_extra = kl_fields(examples, pad_id, packing, ref_logps, max_length) if kl else {}
    if isinstance(examples[0], UnpairedExample):
        return collate_unpaired(examples, pad_id, packing, ref_logps, kl_extra)
    batch = _batch(examples, rows_of(_sequences(examples), pad_id, packing), ref_logps, kl_extra)
    if share_prompt:
        batch.shared = share_prompt_rows(batch.input_ids, batch.attention_mask.sum(dim=1),
                                         torch.tensor([len(e.prompt_ids) for e in examples]), pad_id)
    return batch
