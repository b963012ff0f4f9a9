"""The paged KV pool: one key and one value tensor per layer, indexed by flat slot.

Slot ``b * block_size + o`` is offset ``o`` of block ``b``. Which blocks a sequence owns is the engine's
business (its block manager); the model only writes the slots a ForwardBatch names and reads its sequences'.

The pool's dtype may be narrower than the model's (``--kv-cache-dtype bfloat16`` under a float32 model):
keys and values are rounded when written and widened when read, so the cache holds twice the tokens and
decode attention, which reads the whole cache every step, reads half the bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


KV_CACHE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}  # beside "auto": the model's dtype


def kv_cache_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """A --kv-cache-dtype value as the pool's dtype."""
    if name == "auto":
        return model_dtype
    if name not in KV_CACHE_DTYPES:
        raise ValueError(f"unknown KV cache dtype {name!r}: choose auto, {', '.join(KV_CACHE_DTYPES)}")
    return KV_CACHE_DTYPES[name]


@dataclass(frozen=True, slots=True)
class KVCacheSpec:
    """What a model needs per cached token, so the engine can size the pool before allocating it."""

    num_layers: int
    num_kv_heads: int
    head_dim: int

    def bytes_per_token(self, dtype: torch.dtype) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * torch.finfo(dtype).bits // 8


class PagedKVCache:
    def __init__(
        self,
        spec: KVCacheSpec,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        self.spec = spec
        self.num_blocks = num_blocks
        self.block_size = block_size
        shape = (num_blocks * block_size, spec.num_kv_heads, spec.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(spec.num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(spec.num_layers)]

    def layer(self, index: int) -> tuple[Tensor, Tensor]:
        return self.keys[index], self.values[index]
