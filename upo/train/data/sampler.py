"""The data order: a seeded permutation per epoch, sharded across ranks, resumable from a position; and
the evaluation batches."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from upo.train.errors import UserError


@dataclass
class DataPosition:
    """Where training is in the data: the epoch and the number of its permuted pairs consumed."""

    epoch: int = 0
    index: int = 0


class PairSampler:
    """Global batches from a per-epoch seeded permutation; each rank takes its contiguous share.

    The permutation depends only on ``(seed, epoch)``, so a saved :class:`DataPosition` resumes
    the exact sequence of batches. Incomplete batches at the end of an epoch are dropped so that
    every rank always sees the same number of pairs.
    """

    def __init__(self, indices: Sequence[int], global_batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1):
        if global_batch_size % world_size:
            raise UserError(f"--batch-size {global_batch_size} must be divisible by the number of "
                            f"processes ({world_size})")
        if len(indices) < global_batch_size:
            raise UserError(f"--batch-size {global_batch_size} is larger than the {len(indices)} "
                            "training pairs")
        self.indices = list(indices)
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        self._cached_epoch, self._cached_order = -1, []

    @property
    def batches_per_epoch(self) -> int:
        return len(self.indices) // self.global_batch_size

    def order(self, epoch: int) -> list[int]:
        if epoch != self._cached_epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            perm = torch.randperm(len(self.indices), generator=gen).tolist()
            self._cached_epoch, self._cached_order = epoch, [self.indices[i] for i in perm]
        return self._cached_order

    def global_batch(self, position: DataPosition) -> tuple[list[int], DataPosition]:
        """Every rank's example indices for the next global batch, and the position after it."""
        epoch, index = position.epoch, position.index
        if index + self.global_batch_size > len(self.indices):
            epoch, index = epoch + 1, 0
        batch = self.order(epoch)[index:index + self.global_batch_size]
        return batch, DataPosition(epoch, index + self.global_batch_size)

    def next_batch(self, position: DataPosition) -> tuple[list[int], DataPosition]:
        """This rank's example indices for the next global batch, and the position after it."""
        batch, after = self.global_batch(position)
        share = self.global_batch_size // self.world_size
        return batch[self.rank * share:(self.rank + 1) * share], after

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """Every rank's micro-batches of one epoch, in the loop's order: the first global batch's shares of
        rank 0, 1, ..., then the next global batch's."""
        order, share = self.order(epoch), self.global_batch_size // self.world_size
        batches = []
        for start in range(0, self.batches_per_epoch * self.global_batch_size, self.global_batch_size):
            batches += [order[start + rank * share:start + (rank + 1) * share] for rank in range(self.world_size)]
        return batches


def eval_chunks(indices: list[int], batch_size: int, mismatched: bool) -> list[list[int]]:
    """Evaluation batches of ``batch_size``; with mismatched pairs a last batch of one example (whose rotation
    would pair it with itself) joins the one before."""
    chunks = [indices[start:start + batch_size] for start in range(0, len(indices), batch_size)]
    if mismatched and len(chunks) > 1 and len(chunks[-1]) == 1:
        chunks[-2:] = [chunks[-2] + chunks[-1]]
    return chunks
