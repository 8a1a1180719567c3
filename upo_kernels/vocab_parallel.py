"""Fused linear log-probs on an LM head sharded over the vocabulary (tensor parallelism).

Rank ``r`` of the group holds rows ``[o_r, o_r + V_r)`` of the head (Megatron's layout, a
``Shard(0)`` DTensor) and the same hidden states and labels as every other rank. It runs the
ordinary kernels on its shard, a label of another shard standing for "no target here" (see
``chunked._has_target``), and the per-rank results are merged exactly, as the kernels merge
their vocabulary slices (``token_stats.merge_parts``):

    forward   MAX over ranks of [lse_r (, max logit of the shards left / right of the label)]
              SUM over ranks of [exp(lse_r - M), target logit (, the statistics' partials)]
    backward  the local ``dz = g (onehot - exp(z - lse))`` with the *global* lse gives the local
              grad_weight / grad_bias shard; grad_hidden is summed over the group.

That is 2 collectives of 1-3 (forward) and 2-6 numbers per token, and one of ``tokens x D`` in
the backward (the same all-reduce any tensor-parallel layer with replicated input pays); no rank
ever holds the full weight or a full-vocabulary tile. A rank whose shard is empty takes part
with neutral values.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from upo_kernels.backends import (in_input_dtypes, labelled_rows, run_backward, run_forward,
                                  scattered_outputs)
from upo_kernels.backends import ops as backend_ops
from upo_kernels.token_stats import MAX_LOGIT

_NEG_INF = float("-inf")


class VocabLayout:
    """This rank's shard ``[offset, offset + size)`` of a ``vocab``-row head, and every rank's."""

    def __init__(self, group, offsets: list[int], sizes: list[int], rank: int):
        self.group, self.offsets, self.sizes, self.rank = group, offsets, sizes, rank
        self.offset, self.size = offsets[rank], sizes[rank]
        self.vocab = sum(sizes)


def gather_layout(group, offset: int | None, size: int, n_tokens: int, dim: int, labels: torch.Tensor,
                  ignore_index: int) -> VocabLayout:
    """One small all-gather: every rank's shard (``offset`` None: DTensor's, in the ranks' order),
    token count, hidden size and a fingerprint of its labels. Raises the same ``ValueError`` on
    every rank (none is left waiting in a collective) when the shards do not tile ``[0, V)``
    exactly or the ranks were given different tokens."""
    kept = labels[labels != ignore_index]
    position = torch.arange(1, kept.numel() + 1, device=labels.device, dtype=torch.float64)
    fingerprint = float((kept.to(torch.float64) * torch.sin(position)).sum()) if kept.numel() else 0.0
    mine = torch.tensor([-1 if offset is None else offset, size, n_tokens, dim, kept.numel(), fingerprint],
                        dtype=torch.float64)
    if dist.get_backend(group) == "nccl":
        mine = mine.to(labels.device)
    world = dist.get_world_size(group)
    table = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(table, mine, group=group)
    rows = [[float(x) for x in t.tolist()] for t in table]
    offsets, sizes = [int(r[0]) for r in rows], [int(r[1]) for r in rows]
    if all(o == -1 for o in offsets):  # a DTensor's Shard(0): the shards in the ranks' order
        offsets = [sum(sizes[:r]) for r in range(world)]
    elif any(o == -1 for o in offsets):
        raise ValueError("vocab-parallel: some ranks gave a DTensor weight, others a local shard with vocab_offset")
    for what, col in (("tokens", 2), ("hidden size", 3), ("labelled tokens", 4)):
        if len({r[col] for r in rows}) > 1:
            raise ValueError(f"vocab-parallel: the ranks of process_group have different {what} "
                             f"({[int(r[col]) for r in rows]}): every rank must get the same hidden and labels")
    fingerprints = [r[5] for r in rows]
    if max(fingerprints) - min(fingerprints) > 1e-9 * max(1.0, max(abs(f) for f in fingerprints)):
        raise ValueError("vocab-parallel: the ranks of process_group have different labels: every rank "
                         "must get the same hidden and labels")
    spans = sorted(zip(offsets, sizes))
    end = 0
    for start, size in spans:
        if start != end:
            raise ValueError(f"vocab-parallel: the weight shards (vocab_offset, rows) per rank "
                             f"{list(zip(offsets, sizes))} do not tile the vocabulary [0, {sum(sizes)}): "
                             f"{'gap' if start > end else 'overlap'} at {min(start, end)}")
        end = start + size
    return VocabLayout(group, offsets, sizes, dist.get_rank(group))


def _owner_side(labels: torch.Tensor, layout: VocabLayout):
    """Masks over tokens: the label is in this shard / in a shard right of this one (this shard's
    logits come *before* the label's) / left of it."""
    local = (labels >= layout.offset) & (labels < layout.offset + layout.size)
    label_right = labels >= layout.offset + layout.size
    label_left = labels < layout.offset
    return local, label_right, label_left


def merge_shards(logp, lse, stats_values, stats, labels, layout: VocabLayout):
    """Per-rank (lse, logp with foreign targets = -lse, statistics) -> the global
    (logp, lse, {name: value}) of the kept tokens, identical on every rank."""
    group, dtype = layout.group, lse.dtype
    empty = layout.size == 0
    owned, label_right, label_left = _owner_side(labels, layout)
    top1 = "is_top1" in stats
    maxes = [lse]
    if top1:  # this shard's max logit, as the logits left (ties lose) or right (ties win) of the label
        shard_max = stats_values[MAX_LOGIT]
        maxes += [torch.where(label_right, shard_max, _NEG_INF), torch.where(label_left, shard_max, _NEG_INF)]
    maxed = torch.stack(maxes)
    dist.all_reduce(maxed, op=dist.ReduceOp.MAX, group=group)
    top = maxed[0]
    alpha = torch.zeros_like(lse) if empty else torch.exp(lse - top)
    target = torch.where(owned, logp + lse, torch.zeros_like(lse))  # the label's logit, one rounding of |lse|
    sums = [alpha, target]
    names = [name for name in stats if name != MAX_LOGIT]
    for name in names:
        value = stats_values[name]
        if name == "entropy":  # p = alpha / S * p_r: H = log S + sum_r alpha (H_r + top - lse_r) / S
            part = alpha * (value + (top - lse))
        elif name == "log_sum_sq_probs":
            part = alpha * alpha * torch.exp(value)
        elif name == "mean_logits":
            part = value * layout.size
        else:  # is_top1: the label's shard says whether it is the max there (ties to the first id)
            part = torch.where(owned, value, torch.zeros_like(value))
        sums.append(torch.zeros_like(lse) if empty else part)
    summed = torch.stack(sums)
    dist.all_reduce(summed, op=dist.ReduceOp.SUM, group=group)
    total, target = summed[0], summed[1]
    lse_global = top + torch.log(total)
    values = {}
    for k, name in enumerate(names):
        part = summed[2 + k]
        if name == "entropy":
            values[name] = torch.log(total) + part / total
        elif name == "log_sum_sq_probs":
            values[name] = torch.log(part) - 2 * torch.log(total)
        elif name == "mean_logits":
            values[name] = part / layout.vocab
        else:
            values[name] = ((part > 0.5) & (target > maxed[1]) & (target >= maxed[2])).to(dtype)
    return target - lse_global, lse_global, values


def local_labels(labels: torch.Tensor, layout: VocabLayout) -> torch.Tensor:
    """Global ids -> this shard's row ids; another shard's label becomes ``size`` (no row here)."""
    local = labels - layout.offset
    return torch.where((local >= 0) & (local < layout.size), local, torch.full_like(local, layout.size))


def sum_over_group(tensor: torch.Tensor, layout: VocabLayout) -> torch.Tensor:
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=layout.group)
    return tensor


def _neutral_forward(n_tokens, stats, dtype, device):
    """What an empty shard contributes: no logits (lse = -inf), no target, zero statistics."""
    zeros = torch.zeros((n_tokens,), dtype=dtype, device=device)
    return zeros, torch.full((n_tokens,), _NEG_INF, dtype=dtype, device=device), {name: zeros for name in stats}


class VocabParallelLogprobs(torch.autograd.Function):
    """``functional._LinearLogprobs`` on this rank's weight shard, merged over the group. Every
    rank has the same (hidden, labels), so the same rows run everywhere and the collectives match."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, layout, logit_scale, softcap, ignore_index, backend, chunks,
                stats):
        kernels = backend_ops(backend)
        chunks = dict(chunks, **kernels.call_options())
        rows, h_c, y_c = labelled_rows(hidden, labels, ignore_index)
        y_local = local_labels(y_c, layout)  # every row is kept: -1 never is a label, so it is the local ignore_index
        kernel_stats = stats + ((MAX_LOGIT,) if "is_top1" in stats else ())
        if layout.size == 0:
            dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
            logp_c, lse_c, values = _neutral_forward(y_c.numel(), kernel_stats, dtype, hidden.device)
        else:
            logp_c, lse_c, values = run_forward(kernels, h_c, weight, y_local, bias, logit_scale, softcap, -1, chunks,
                                                kernel_stats)
        del h_c
        logp_c, lse_c, values = merge_shards(logp_c, lse_c, values, stats, y_c, layout)
        ctx.save_for_backward(hidden, weight, bias, y_local, lse_c, rows)
        ctx.options = (layout, logit_scale, softcap, backend, chunks)
        return scattered_outputs(ctx, logp_c, values, stats, rows, labels.shape)

    @staticmethod
    def backward(ctx, grad_logp, *_stat_grads):
        hidden, weight, bias, y_local, lse, rows = ctx.saved_tensors
        layout, logit_scale, softcap, backend, chunks = ctx.options
        needs = need_h, need_w, need_b = ctx.needs_input_grad[:3]
        if layout.size == 0:
            grads = (hidden.new_zeros(hidden.shape) if need_h else None, torch.zeros_like(weight) if need_w else None,
                     torch.zeros_like(bias) if (need_b and bias is not None) else None)
        else:
            grads = run_backward(backend_ops(backend), grad_logp, rows, hidden, weight, y_local, lse, bias,
                                 logit_scale, softcap, -1, needs, chunks)
        if need_h:  # summed over the group before the cast: one rounding to hidden's dtype
            grads = (sum_over_group(grads[0].contiguous(), layout), *grads[1:])
        return (*in_input_dtypes(grads, hidden, weight, bias, needs), None, None, None, None, None, None, None, None)


def local_shard(tensor):
    """A DTensor's shard on this rank (``to_local``: the same storage), else ``tensor`` itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _dtensor_class():
    if not dist.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


def local_tensors(hidden, weight, bias, process_group, vocab_offset):
    """The head's sharding, from a DTensor weight (``Shard(0)`` on a 1-D mesh) or from
    ``process_group`` + ``vocab_offset`` -> (hidden, weight, bias as local tensors, group, offset),
    offset None meaning "from the ranks' order" (DTensor's layout); or None: not sharded.
    ``DTensor.to_local`` is differentiable, so gradients reach the DTensor parameters."""
    dtensor = _dtensor_class()
    sharded = dtensor is not None and isinstance(weight, dtensor)
    if not sharded:
        if dtensor is not None and isinstance(hidden, dtensor):
            raise TypeError("hidden is a DTensor but weight is not: give the LM head as a Shard(0) DTensor, "
                            "or plain tensors with process_group and vocab_offset")
        if process_group is None and vocab_offset is None:
            return None
        if process_group is None or vocab_offset is None:
            missing = "vocab_offset" if vocab_offset is None else "process_group"
            raise ValueError(f"{missing} is missing: a hand-sharded LM head needs both process_group and "
                             "vocab_offset (this rank's first vocabulary id)")
        if not isinstance(vocab_offset, int) or isinstance(vocab_offset, bool) or vocab_offset < 0:
            raise ValueError(f"vocab_offset must be a non-negative int, got {vocab_offset!r}")
        if dtensor is not None and isinstance(bias, dtensor):
            raise TypeError("bias is a DTensor but weight is not: pass both as DTensors or both as local shards")
        return hidden, weight, bias, _checked_group(process_group), vocab_offset
    from torch.distributed.tensor import Replicate, Shard

    mesh = weight.device_mesh
    if mesh.ndim != 1 or tuple(weight.placements) != (Shard(0),):
        raise ValueError(f"weight: a DTensor LM head must be Shard(0) over a 1-D device mesh (the tensor-parallel "
                         f"dim), got placements {tuple(weight.placements)} on a {mesh.ndim}-D mesh: pass "
                         "weight.to_local() with process_group and vocab_offset instead")
    group = mesh.get_group()
    if process_group is not None and (dist.get_process_group_ranks(_checked_group(process_group))
                                      != dist.get_process_group_ranks(group)):
        raise ValueError("process_group is not the group of weight's device mesh (mismatched groups): "
                         "leave process_group out with a DTensor weight")
    if vocab_offset is not None:
        raise ValueError("vocab_offset is given by weight's DTensor layout: leave it out with a DTensor weight")
    if isinstance(hidden, dtensor):
        if hidden.device_mesh != mesh or any(not isinstance(p, Replicate) for p in hidden.placements):
            raise ValueError("hidden: a DTensor hidden must be Replicate on weight's device mesh")
        hidden = hidden.to_local()
    if isinstance(bias, dtensor):
        if bias.device_mesh != mesh or tuple(bias.placements) != (Shard(0),):
            raise ValueError("bias: a DTensor bias must be Shard(0) on weight's device mesh, as the weight")
        bias = bias.to_local()
    return hidden, weight.to_local(), bias, group, None


def _checked_group(group):
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("process_group: torch.distributed is not initialised (init_process_group first)")
    if group is None or group == dist.GroupMember.NON_GROUP_MEMBER or dist.get_rank(group) < 0:
        raise ValueError("process_group: this rank is not a member of the group (mismatched groups)")
    return group
