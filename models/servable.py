"""What the engine needs from a model: the one contract GPT-2, GPT-OSS and the tensor-parallel executor keep.

The engine never asks which model it runs. What differs between them (can a decode step be captured, can a
forward be given up between layers) is declared once, in ``Capabilities``, and the lifecycle of a model that
runs beside other processes (tensor-parallel ranks) goes through ``attach`` and ``stop``, which a
single-process model inherits as no-ops from here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from torch import Tensor

from models.forward_batch import ForwardBatch, Interrupt
from models.kv_cache import KVCacheSpec, PagedKVCache


@dataclass(frozen=True, slots=True)
class Capabilities:
    captures_cuda_graphs: bool  # a decode step runs no host syncs or collectives, so it can be replayed
    interruptible: bool  # forward honours ``interrupt`` between layers (ForwardInterrupted)
    packed_experts: bool = False  # MoE experts stay MXFP4 blocks, dequantized per step (less memory, slower)


@runtime_checkable
class ServableModel(Protocol):
    """Implemented by subclassing, so that mypy checks every implementer and the no-op lifecycle is shared."""

    @property
    def max_context(self) -> int:
        """The most positions one sequence may hold."""
        ...

    @property
    def capabilities(self) -> Capabilities: ...

    def kv_cache_spec(self) -> KVCacheSpec:
        """The layout of the KV cache this model (this rank's shard) reads and writes."""
        ...

    def __call__(self, batch: ForwardBatch, cache: PagedKVCache, interrupt: Interrupt | None = None) -> Tensor:
        """The forward: final hidden states of every token of ``batch``; raises ForwardInterrupted if
        ``interrupt`` fires (only where ``capabilities.interruptible``)."""
        ...

    def compute_logits(self, hidden: Tensor) -> Tensor:
        """float32 logits of ``hidden`` rows over the whole (possibly padded) vocabulary."""
        ...

    def attach(self, cache: PagedKVCache, on_failure: Callable[[str], None]) -> None:
        """The engine's KV pool exists and the engine is about to run: ``on_failure`` (called from any thread)
        fails the engine when something the model needs outside this process is gone."""
        del cache, on_failure  # a single-process model needs nothing outside this process

    def stop(self) -> None:
        """After the engine thread has stopped: release what ``attach`` set going."""
        return
