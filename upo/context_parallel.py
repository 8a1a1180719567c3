"""Context parallelism: each sequence of a batch split along its tokens over the ranks of a process group.

Every rank of the group holds the same batch. The model rows (the unshared ``[prompt, response]`` rows, or the
``[prompt, chosen, rejected]`` rows of prompt sharing) are padded to a multiple of ``2N`` and each rank runs only
its two balanced chunks (``upo_kernels.context_parallel.balanced_chunks``) through the model, with their global
position ids. In attention (:meth:`ContextParallelRows.attention`, reached through the model's own forward like
prompt sharing's block attention) each rank keeps its queries and all-gathers the keys and values; each query
segment attends, with ``upo_kernels.prefix_attention.prefix_causal_attention``, every key range before it that it
may see (the prefix) and its own keys causally. Under prompt sharing a rejected segment's prefix is the prompt and
the rejected tokens before it, never the chosen response.

The loss: labels are shifted before the split (they are the batch's, aligned with the unshared rows), each rank
takes its own labelled tokens, in sequence order, as a packed batch (``token_index``, ``labels``,
``cu_seqlens``), and ``upo.fused_loss(..., sequence_group=group)`` sums the per-sequence log-probs, token counts
and statistics over the group once. Every rank then computes the same loss; the parameter gradients, summed over
the group, are one process's. The value head's prompt position lives on one rank (:meth:`prompt_hidden`,
:meth:`owned_values`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from upo_kernels.context_parallel import (balanced_chunks, gather_sequence, local_positions, padded_length,
                                          sum_over_ranks)
from upo_kernels.prefix_attention import prefix_causal_attention

# A query segment: (local start, local end, global start, prefix key ranges); prefix None: padding (zeros out).
Segment = tuple[int, int, int, tuple[tuple[int, int], ...] | None]


@dataclass
class ContextParallelRows:
    """One rank's part of a batch's model rows, and where its labelled tokens go in the loss.

    ``input_ids``/``position_ids`` ``[rows, L / N]``: this rank's two chunks of each padded row. ``plans``: per
    row, its query segments (rows with equal plans run together). ``token_index`` ``[n]``: this rank's labelled
    tokens as indices into its flattened ``[rows * L / N]`` hidden states, in sequence order; ``labels`` ``[n]``
    their targets; ``cu_seqlens`` ``[2B + 1]`` their offsets per sequence (chosen rows, then rejected).
    ``prompt_index`` ``[B]``: each pair's last prompt position in the flattened local hidden states, -1 where
    another rank holds it."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    plans: tuple
    token_index: torch.Tensor
    labels: torch.Tensor
    cu_seqlens: torch.Tensor
    prompt_index: torch.Tensor
    length: int
    rank: int
    size: int
    group: Any = field(default=None, compare=False)

    def to(self, device) -> "ContextParallelRows":
        moved = {name: getattr(self, name).to(device) for name in
                 ("input_ids", "position_ids", "token_index", "labels", "cu_seqlens", "prompt_index")}
        return ContextParallelRows(plans=self.plans, length=self.length, rank=self.rank, size=self.size,
                                   group=self.group, **moved)

    # ---- the model's attention -------------------------------------------------------------------
    def attention(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling=None,
                  dropout: float = 0.0) -> torch.Tensor:
        """``query`` ``[rows, H, L/N, hd]`` (this rank's), ``key``/``value`` ``[rows, KVH, L/N, hd]`` -> the
        attention output ``[rows, L/N, H, hd]``, as transformers' attention functions return it."""
        whole = gather_sequence(torch.stack([key, value]), self.group, dim=3)  # one collective for both
        key_all, value_all = whole[0], whole[1]
        rows_by_plan: dict = {}
        for row, plan in enumerate(self.plans):
            rows_by_plan.setdefault(plan, []).append(row)
        outputs = [None] * len(self.plans)
        for plan, rows in rows_by_plan.items():
            index = torch.tensor(rows, device=query.device) if len(rows) < len(self.plans) else None
            pick = (lambda t: t) if index is None else (lambda t: t.index_select(0, index))
            out = _plan_attention(pick(query), pick(key_all), pick(value_all), plan, scaling, dropout)
            for k, row in enumerate(rows):
                outputs[row] = out[k:k + 1]
        return torch.cat(outputs).transpose(1, 2).contiguous()

    # ---- the loss ---------------------------------------------------------------------------------
    def loss_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[rows, L/N, D]`` local hidden states -> ``[n, D]`` this rank's labelled tokens, packed."""
        return hidden.reshape(-1, hidden.shape[-1]).index_select(0, self.token_index)

    def prompt_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[B, D]`` each pair's hidden state at its last prompt token, on every rank (detached: the value head
        reads it without a gradient into the policy)."""
        flat = hidden.detach().reshape(-1, hidden.shape[-1])
        owned = self.prompt_index >= 0
        partial = torch.where(owned[:, None], flat[self.prompt_index.clamp(min=0)], torch.zeros_like(flat[:1]))
        return sum_over_ranks(partial, self.group)

    def owned_values(self, values: torch.Tensor) -> torch.Tensor:
        """``[B]`` values every rank computed alike, kept with their gradient only on the rank that holds the
        prompt position, then summed: the value head's gradient, summed over the group, is one process's."""
        owned = self.prompt_index >= 0
        return sum_over_ranks(torch.where(owned, values, torch.zeros_like(values)), self.group)


def _plan_attention(query, key_all, value_all, plan, scaling, dropout):
    parts = []
    for local_start, local_end, start, prefix in plan:
        q = query[:, :, local_start:local_end]
        if prefix is None:  # padding of a shared row: no row of the loss reads it
            parts.append(q.new_zeros(q.shape[0], q.shape[1], q.shape[2], value_all.shape[-1]))
            continue
        end = start + local_end - local_start
        prefix_key = _ranges(key_all, prefix)
        prefix_value = _ranges(value_all, prefix)
        parts.append(prefix_causal_attention(q, prefix_key, prefix_value, key_all[:, :, start:end],
                                             value_all[:, :, start:end], scale=scaling, dropout_p=dropout))
    return torch.cat(parts, dim=2)


def _ranges(tensor: torch.Tensor, ranges) -> torch.Tensor:
    pieces = [tensor[:, :, a:b] for a, b in ranges if b > a]
    if not pieces:
        return tensor[:, :, :0]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=2)


# ---- building one rank's rows ----------------------------------------------------------------------------
def causal_plan(length: int, rank: int, size: int) -> tuple[Segment, ...]:
    """Plain causal rows: each chunk attends everything before it and itself causally."""
    chunk, first, second = balanced_chunks(length, rank, size)
    return ((0, chunk, first, ((0, first),)), (chunk, 2 * chunk, second, ((0, second),)))


def shared_plan(length: int, rank: int, size: int, span: tuple[int, int, int]) -> tuple[Segment, ...]:
    """A ``[prompt, chosen, rejected, padding]`` row: ``[prompt, chosen]`` causally; a rejected token sees the
    prompt and the rejected tokens up to itself, not the chosen response; padding gets zeros."""
    prompt, chosen, rejected = span
    rejected_start, real = prompt + chosen, prompt + chosen + rejected
    chunk, first, second = balanced_chunks(length, rank, size)
    segments = []
    for local, start in ((0, first), (chunk, second)):
        cuts = sorted({start, start + chunk, *(b for b in (rejected_start, real) if start < b < start + chunk)})
        for a, b in zip(cuts, cuts[1:]):
            if a >= real:
                prefix = None
            elif a >= rejected_start:
                prefix = ((0, prompt), (rejected_start, a))
            else:
                prefix = ((0, a),)
            segments.append((local + a - start, local + b - start, a, prefix))
    return tuple(segments)


def split_rows(input_ids: torch.Tensor, position_ids: torch.Tensor | None, labels: torch.Tensor,
               source: torch.Tensor | None, prompt_last_index: torch.Tensor, pad_id: int, rank: int, size: int,
               spans: tuple | None = None, group=None, ignore_index: int = -100) -> ContextParallelRows:
    """This rank's :class:`ContextParallelRows` of a batch.

    ``input_ids``/``position_ids`` ``[rows, S]``: the rows the model runs (``position_ids`` None: ``0..S-1``).
    ``labels`` ``[2B, T]``: the unshared rows' shifted labels; ``source`` ``[2B, T]``: each unshared position's
    flat position in ``[rows * S]`` (None: the model rows are the unshared rows). ``prompt_last_index`` ``[B]``:
    the last prompt position in each chosen row. ``spans``: prompt sharing's (prompt, chosen, rejected) per row."""
    rows, width = input_ids.shape
    length = padded_length(width, size)
    device = input_ids.device
    if position_ids is None:
        position_ids = torch.arange(width, device=device).expand(rows, width)
    padded_ids = F.pad(input_ids, (0, length - width), value=pad_id)
    padded_positions = F.pad(position_ids, (0, length - width), value=0)
    local = local_positions(length, rank, size, device=device)
    chunk = length // (2 * size)
    if source is None:
        if tuple(labels.shape) != (rows, width):
            raise ValueError(f"labels {tuple(labels.shape)} must match the model rows {(rows, width)}")
        source = torch.arange(rows * width, device=device).reshape(rows, width)
    # where each global position of a row lives: its rank and its index among that rank's local positions
    positions = torch.arange(length, device=device)
    chunk_of = positions // chunk
    owner = torch.where(chunk_of < size, chunk_of, 2 * size - 1 - chunk_of)
    local_of = positions % chunk + torch.where(chunk_of < size, 0, chunk)
    row_of, position_of = source // width, source % width
    keep = labels != ignore_index
    mine = keep & (owner[position_of] == rank)
    token_index = (row_of * (2 * chunk) + local_of[position_of])[mine]
    counts = mine.sum(dim=1)
    cu_seqlens = F.pad(counts.cumsum(0), (1, 0)).to(torch.int32)
    pairs = prompt_last_index.shape[0]
    prompt_flat = source[torch.arange(pairs, device=device), prompt_last_index]
    prompt_row, prompt_position = prompt_flat // width, prompt_flat % width
    prompt_index = torch.where(owner[prompt_position] == rank,
                               prompt_row * (2 * chunk) + local_of[prompt_position], -1)
    if spans is None:
        plans = (causal_plan(length, rank, size),) * rows
    else:
        plans = tuple(shared_plan(length, rank, size, span) for span in spans)
    return ContextParallelRows(padded_ids[:, local], padded_positions[:, local], plans, token_index,
                               labels[mine], cu_seqlens, prompt_index, length, rank, size, group)
