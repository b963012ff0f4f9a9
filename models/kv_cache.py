"""The paged KV pool: one key and one value tensor per layer, indexed by flat slot.

Slot ``b * block_size + o`` is offset ``o`` of block ``b``. Which blocks a sequence owns is the engine's
business (its block manager); the model only writes the slots a ForwardBatch names and reads its sequences'.

The pool's dtype may be narrower than the model's (``--kv-cache-dtype bfloat16`` under a float32 model):
keys and values are rounded when written and widened when read, so the cache holds twice the tokens and
decode attention, which reads the whole cache every step, reads half the bytes.

KV groups (GPT-OSS): layers with the same attention window form a group, and each group has its own block
tables, so the sliding-window layers' blocks behind the window can be freed while the full-attention layers
keep theirs. Blocks come from one pool for every group: block ``b`` of tensor ``i`` belongs to the i-th layer
of whichever group holds ``b`` now. GPT-OSS alternates sliding and full layers, so a grouped pool has half the
layers' tensors and a sequence longer than the window needs about half the bytes (the vLLM hybrid allocator's
idea). An ungrouped pool (the default; offline generation and model tests) gives every layer its own tensor.
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
    windows: tuple[int | None, ...] = ()  # per layer: its sliding window, None for full attention; () all full

    @property
    def group_windows(self) -> tuple[int | None, ...]:
        """The window of each KV group: full attention first (the block manager's reference group, kept even
        with no layer in it), then each distinct sliding window."""
        return (None, *sorted({w for w in self.windows if w is not None}))

    def layer_group(self, layer: int) -> int:
        return self.group_windows.index(self.windows[layer] if self.windows else None)

    def layer_tensor(self, layer: int, grouped: bool) -> int:
        """Which of the pool's tensors holds ``layer``: its rank within its group in a grouped pool."""
        if not grouped:
            return layer
        group = self.layer_group(layer)
        return sum(1 for i in range(layer) if self.layer_group(i) == group)

    def num_tensors(self, grouped: bool) -> int:
        if not grouped:
            return self.num_layers
        return max(sum(1 for i in range(self.num_layers) if self.layer_group(i) == g)
                   for g in range(len(self.group_windows)))

    def bytes_per_token(self, dtype: torch.dtype, grouped: bool = False) -> int:
        """Bytes of one token slot of the pool: of one layer group's token in a grouped pool."""
        return 2 * self.num_tensors(grouped) * self.num_kv_heads * self.head_dim * torch.finfo(dtype).bits // 8


class PagedKVCache:
    def __init__(
        self,
        spec: KVCacheSpec,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        grouped: bool = False,
    ) -> None:
        self.spec = spec
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.grouped = grouped
        self.num_groups = len(spec.group_windows) if grouped else 1
        shape = (num_blocks * block_size, spec.num_kv_heads, spec.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(spec.num_tensors(grouped))]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(spec.num_tensors(grouped))]
        self._tensor = [spec.layer_tensor(i, grouped) for i in range(spec.num_layers)]
        self._group = [spec.layer_group(i) if grouped else 0 for i in range(spec.num_layers)]

    def layer(self, index: int) -> tuple[Tensor, Tensor]:
        return self.keys[self._tensor[index]], self.values[self._tensor[index]]

    def group_of(self, layer: int) -> int:
        """The KV group (index into a ForwardBatch's views) whose block tables ``layer`` reads."""
        return self._group[layer]
