"""Tensor parallelism as the models see it: which rank this is, how a dimension splits, and the one collective.

A model built with ``SINGLE`` (world size 1) is the ordinary single-process model: nothing is split and
``all_reduce`` returns its argument, so that path pays nothing. With N ranks, every rank holds a contiguous
1/N slice of each split dimension (heads, MLP columns, experts) and the partial results of row-parallel
layers are summed with ``all_reduce``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch import Tensor

from models.checkpoint import CheckpointError

Ranges = list[tuple[int, int]]  # [start, stop) pieces of one dimension, read and concatenated in order


@dataclass(frozen=True, slots=True)
class TensorParallel:
    rank: int = 0
    world_size: int = 1
    group: dist.ProcessGroup | None = None  # None: the default group

    @property
    def is_first(self) -> bool:
        """Rank 0 adds the biases of row-parallel layers once, and is the only one that computes logits."""
        return self.rank == 0

    def all_reduce(self, x: Tensor) -> Tensor:
        """Sum ``x`` over the ranks, in place."""
        if self.world_size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def local(self, size: int, what: str) -> int:
        """This rank's share of ``size`` (``what`` names it for the error when N does not divide it)."""
        if size % self.world_size:
            raise CheckpointError(f"{what}={size} is not divisible by --tensor-parallel-size {self.world_size}")
        return size // self.world_size

    def ranges(self, *part_sizes: int) -> Ranges:
        """This rank's slice of each fused part (e.g. q, k, v side by side) of a dimension."""
        ranges, offset = [], 0
        for size in part_sizes:
            share = size // self.world_size
            ranges.append((offset + self.rank * share, offset + (self.rank + 1) * share))
            offset += size
        return ranges


SINGLE = TensorParallel()
