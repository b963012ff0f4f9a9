"""Tensor parallelism as the models see it: which rank this is, how a dimension splits, and the one collective.

A model built with ``SINGLE`` (world size 1) is the ordinary single-process model: nothing is split and
``all_reduce`` returns its argument, so that path pays nothing. With N ranks, every rank holds a contiguous
1/N slice of each split dimension (heads, MLP columns, experts) and the partial results of row-parallel
layers are summed with ``all_reduce``. A column-parallel layer needs no class of its own: it is a plain
``nn.Linear`` over this rank's slice of the output features (the loaders read only that slice).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

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


class RowParallelLinear(nn.Linear):
    """A Linear whose input features are split over the ranks: partial products are summed, then the bias added."""

    def __init__(self, in_features: int, out_features: int, tp: TensorParallel) -> None:
        super().__init__(in_features, out_features)
        self.tp = tp

    def forward(self, x: Tensor) -> Tensor:
        return self.tp.all_reduce(F.linear(x, self.weight)) + self.bias


def row_parallel_linear(in_features: int, out_features: int, tp: TensorParallel) -> nn.Linear:
    """The layer that brings a split dimension back to the whole hidden size (attention's output projection,
    the MLP's down projection): plain on one rank, so that path runs no collective."""
    if tp.world_size == 1:
        return nn.Linear(in_features, out_features)
    return RowParallelLinear(in_features, out_features, tp)
