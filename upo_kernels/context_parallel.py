"""Collectives for a sequence split over the ranks of a process group (context parallelism), with autograd.

Every rank of a context-parallel group runs the same loss on the same batch, each over its own tokens. Two
collectives carry what crosses ranks, each with the backward that makes every parameter's gradient, summed over the
group, equal to one process's:

* :func:`gather_sequence` (the keys and values of attention): the forward all-gathers each rank's chunks into the
  whole sequence; the backward sums the whole sequence's gradient over the ranks (every rank's queries read every
  rank's keys) and keeps this rank's chunks.
* :func:`sum_over_ranks` (per-sequence log-prob sums, token counts, the value head's prompt value): the forward
  all-reduces a partial sum; the backward hands each rank the gradient of the total unchanged, since every rank
  computes the same loss from the same total, and each rank's part reaches only its own tokens.

The load balance of causal attention (:func:`balanced_chunks`): the padded sequence is cut into ``2N`` chunks and
rank ``r`` takes chunks ``r`` and ``2N - 1 - r``, so that every rank has as many early (cheap) as late (expensive)
queries. Gloo and NCCL alike: only ``all_gather_into_tensor``/``all_gather`` and ``all_reduce`` are used.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


# torch 2.13 renamed all_gather_into_tensor (deprecated there) to all_gather_single
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def padded_length(length: int, size: int) -> int:
    """The smallest multiple of ``2 * size`` that holds ``length`` tokens."""
    step = 2 * size
    return -(-length // step) * step


def balanced_chunks(length: int, rank: int, size: int) -> tuple[int, int, int]:
    """``(chunk, first_start, second_start)``: rank ``rank`` of ``size`` holds the global positions
    ``[first_start, first_start + chunk)`` and ``[second_start, second_start + chunk)`` of a sequence padded to
    ``length`` (a multiple of ``2 * size``)."""
    if length % (2 * size):
        raise ValueError(f"length {length} is not a multiple of 2 * {size}")
    if not 0 <= rank < size:
        raise ValueError(f"rank {rank} is not in 0..{size - 1}")
    chunk = length // (2 * size)
    return chunk, rank * chunk, (2 * size - 1 - rank) * chunk


def local_positions(length: int, rank: int, size: int, device=None) -> torch.Tensor:
    """``[length / size]`` global positions this rank holds, its two chunks in order."""
    chunk, first, second = balanced_chunks(length, rank, size)
    return torch.cat([torch.arange(first, first + chunk, device=device),
                      torch.arange(second, second + chunk, device=device)])


def _group_facts(group) -> tuple[int, int]:
    return dist.get_rank(group), dist.get_world_size(group)


def _to_global_order(gathered: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    """``gathered`` holds each rank's ``[chunk r, chunk 2N-1-r]`` in rank order along ``dim``: the global order."""
    chunks = gathered.chunk(2 * size, dim=dim)  # rank r's two chunks are chunks[2r], chunks[2r + 1]
    order = [chunks[2 * r] for r in range(size)] + [chunks[2 * r + 1] for r in reversed(range(size))]
    return torch.cat(order, dim=dim)


def _this_rank_part(whole: torch.Tensor, rank: int, size: int, dim: int) -> torch.Tensor:
    chunks = whole.chunk(2 * size, dim=dim)
    return torch.cat([chunks[rank], chunks[2 * size - 1 - rank]], dim=dim)


class _GatherSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local, group, dim):
        rank, size = _group_facts(group)
        ctx.group, ctx.dim, ctx.rank, ctx.size = group, dim, rank, size
        moved = local.movedim(dim, 0).contiguous()
        gathered = moved.new_empty((size * moved.shape[0], *moved.shape[1:]))
        _ALL_GATHER(gathered, moved, group=group)
        return _to_global_order(gathered, size, 0).movedim(0, dim)

    @staticmethod
    def backward(ctx, grad_whole):
        grad = grad_whole.contiguous()
        dist.all_reduce(grad, group=ctx.group)  # every rank's queries read this rank's keys
        return _this_rank_part(grad, ctx.rank, ctx.size, ctx.dim), None, None


def gather_sequence(local: torch.Tensor, group, dim: int) -> torch.Tensor:
    """The whole sequence along ``dim`` from each rank's two balanced chunks (``local`` holds this rank's, chunk
    ``r`` then chunk ``2N-1-r``, of equal length). Differentiable: the backward sums over the ranks."""
    return _GatherSequence.apply(local, group, dim)


class _SumOverRanks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, partial, group):
        total = partial.clone()
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        return grad_total, None  # every rank differentiates the same loss of the same total


def sum_over_ranks(partial: torch.Tensor, group) -> torch.Tensor:
    """The sum of ``partial`` over the group's ranks; the gradient of the sum reaches each rank's part unchanged
    (each rank computes the same loss from it). Integer tensors (token counts) are summed without autograd."""
    if not partial.is_floating_point():
        total = partial.clone()
        dist.all_reduce(total, group=group)
        return total
    return _SumOverRanks.apply(partial, group)
