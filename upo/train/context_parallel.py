"""``--cp N``: context parallelism over the ``cp`` dimension of a ``("dp", "cp")`` device mesh.

``torchrun --nproc-per-node W -m upo.train --cp N``: the W processes form ``W / N`` data-parallel groups of ``N``
processes each. The ``N`` processes of a group take the same batch (the data sampler's rank and size are the ``dp``
coordinate and size) and each runs its share of every sequence's tokens (``upo/context_parallel.py``: the balanced
chunks, attention over gathered keys and values, the loss's sums reduced over the group once). Each process's
parameter gradients are then its own tokens' contributions: they are summed over ``cp`` and averaged over ``dp``
(:func:`sum_gradients_over_cp`, a DDP communication hook; under FSDP2 :func:`undo_fsdp_mean_over_cp`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from upo.context_parallel import ContextParallelRows, split_rows
from upo.train.runtime import check_processes_per_group
from upo_kernels.vocab_parallel import local_shard


def check_cp(config, world_size: int, is_main: bool = True) -> None:
    """``--cp``: a divisor of the process count (one line, exit 2; the settings it refuses: config.py)."""
    check_processes_per_group("--cp", config.cp, f"splits each sequence over {config.cp} processes", world_size,
                              is_main)


@dataclass
class SequenceSplit:
    """This process's place in its ``cp`` group: :meth:`rows` is its part of a batch."""

    group: Any
    rank: int
    size: int

    def rows(self, batch) -> ContextParallelRows:
        """This rank's :class:`ContextParallelRows` of a padded :class:`PreferenceBatch` (shared rows too)."""
        shared = batch.shared
        if shared is not None:
            return split_rows(shared.input_ids, shared.position_ids, batch.labels, shared.source,
                              batch.prompt_last_index, 0, self.rank, self.size, spans=shared.spans,
                              group=self.group)
        return split_rows(batch.input_ids, None, batch.labels, None, batch.prompt_last_index, 0, self.rank,
                          self.size, group=self.group)


def setup_cp_mesh(runtime, cp: int) -> SequenceSplit | None:
    """The ``("dp", "cp")`` mesh on ``runtime`` (``runtime.cp``, ``runtime.mesh``) and this rank's split;
    None for ``cp`` 1."""
    if cp == 1:
        return None
    from torch.distributed.device_mesh import init_device_mesh

    runtime.cp = cp
    runtime.mesh = init_device_mesh(runtime.device.type, (runtime.world_size // cp, cp), mesh_dim_names=("dp", "cp"))
    assert runtime.mesh["dp"].get_local_rank() == runtime.dp_rank
    return SequenceSplit(runtime.mesh["cp"].get_group(), runtime.mesh["cp"].get_local_rank(), cp)


def _sum_cp_mean_dp(dp_size: int, bucket):
    """DDP communication hook: the bucket summed over every process, divided by the data-parallel size only."""
    tensor = bucket.buffer().div_(dp_size)
    return dist.all_reduce(tensor, async_op=True).get_future().then(lambda fut: fut.value()[0])


def sum_gradients_over_cp(model: nn.Module, runtime) -> None:
    """Under DDP, make its gradient all-reduce a sum over ``cp`` and a mean over ``dp``: it divides by every
    process, but the ``cp`` processes of a group each hold a part of one batch's gradient. (FSDP2's own divide
    factor needs a pre-multiplied sum that gloo lacks: :func:`undo_fsdp_mean_over_cp` scales after it instead.)"""
    if runtime.cp > 1 and hasattr(model, "register_comm_hook"):
        model.register_comm_hook(runtime.dp_size, _sum_cp_mean_dp)


def undo_fsdp_mean_over_cp(params, runtime, fsdp: bool) -> None:
    """Under FSDP2 with ``--cp``, its reduce-scatter averaged the gradient shards over every process: times ``cp``,
    they are summed over ``cp`` and averaged over ``dp``."""
    if runtime.cp == 1 or not fsdp or not runtime.distributed:
        return
    with torch.no_grad():
        for p in params:
            if p.grad is not None:
                local_shard(p.grad).mul_(runtime.cp)
