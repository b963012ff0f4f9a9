"""What the engine and the offline generator need from a model: GPT2, GptOss and the tensor-parallel wrapper.

A Protocol rather than ``nn.Module``: torch types every attribute a module does not declare as
``Tensor | Module``, so through ``nn.Module`` a call to ``compute_logits`` does not type-check.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from torch import Tensor
from torch.nn import Parameter

from models.forward_batch import ForwardBatch, Interrupt
from models.kv_cache import KVCacheSpec, PagedKVCache


class CausalLM(Protocol):
    def __call__(self, batch: ForwardBatch, cache: PagedKVCache, interrupt: Interrupt | None = None) -> Tensor:
        """Hidden states [tokens, hidden] of the batch's tokens, whose K/V also go into the cache."""
        ...

    def compute_logits(self, hidden: Tensor) -> Tensor: ...

    def kv_cache_spec(self) -> KVCacheSpec: ...

    def parameters(self, recurse: bool = True) -> Iterator[Parameter]: ...

    @property
    def max_context(self) -> int: ...

    @property
    def captures_cuda_graphs(self) -> bool: ...

    @property
    def interruptible(self) -> bool: ...
