"""Decode steps replayed from captured CUDA graphs: one launch instead of a few hundred.

A GPT-2-124M decode step is ~300 small kernels; launched one at a time from Python they take longer than
the GPU takes to run them. A step whose chunks are all one token long (decodes, or one-token prefill
pieces) is padded to a captured batch size and replayed over static input buffers instead.

One graph is captured at start-up per batch-rows bucket, rounded up to a power of two (the largest bucket is
the limit itself). Attention through the Triton kernel (models/attention.py) reads only the blocks each row's
context fills, so one table width (the longest context's) serves every step, and a step writes only as many
of its columns as its own longest context needs (the kernel never reads past a row's context). Where attention
gathers every row's keys from its table instead (no Triton), a graph is captured per (rows, key blocks per row)
bucket as well: one sized for the longest context would read up to 8x more cache than a step needs. Padding
rows write and read only a scratch block that the block manager never hands out. Each KV group of the pool (models/
kv_cache.py) has its own slots and key blocks among the inputs. All graphs share one memory
pool: replays never overlap, and each graph's output stays allocated.

On CPU nothing is captured: the same padded static forward runs eagerly, so the suite can check the
padding and bucketing against the plain path without a GPU.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from models import attention
from models.forward_batch import AttentionGroup, ForwardBatch, KVView
from models.kv_cache import PagedKVCache
from models.servable import ServableModel
from server.engine.scheduler import ScheduledChunk

log = logging.getLogger("gptserve.engine")


def buckets(limit: int) -> list[int]:
    """1, 2, 4, ... below ``limit``, then ``limit`` itself."""
    sizes = [1]
    while sizes[-1] * 2 < limit:
        sizes.append(sizes[-1] * 2)
    return sizes + [limit] if limit > 1 else sizes


@dataclass(slots=True)
class _Bucket:
    rows: int
    blocks: int
    # flat int64: token ids, positions, context lens [rows]; per KV group slots [rows], key blocks [rows * blocks]
    inputs: Tensor
    graph: torch.cuda.CUDAGraph | None = None
    logits: Tensor | None = None  # [rows, vocab] float32, rewritten by every replay


class DecodeGraphs:
    def __init__(
        self, model: ServableModel, cache: PagedKVCache, max_rows: int, max_blocks: int, scratch_block: int
    ) -> None:
        self.model = model
        self.cache = cache
        self.scratch_block = scratch_block
        self.device = cache.keys[0].device
        self.row_buckets = buckets(max_rows)
        self.tables_read_in_place = attention.triton_attention_applies(self.device)
        self.block_buckets = [max_blocks] if self.tables_read_in_place else buckets(max_blocks)
        self.steps = 0  # decode steps served here, for tests and logs
        captures = self.device.type == "cuda"
        pool = torch.cuda.graph_pool_handle() if captures else None
        started = time.monotonic()
        self._buckets: dict[tuple[int, int], _Bucket] = {}
        for rows in reversed(self.row_buckets):  # largest first, so smaller graphs reuse its pool memory
            for blocks in reversed(self.block_buckets):
                bucket = _Bucket(rows, blocks, self._padding(rows, blocks).to(self.device))
                if captures:
                    self._capture(bucket, pool)
                self._buckets[rows, blocks] = bucket
        if captures:
            log.info("captured %d decode CUDA graphs in %.1f s", len(self._buckets), time.monotonic() - started)

    @property
    def max_rows(self) -> int:
        return self.row_buckets[-1]

    def serves(self, chunks: list[ScheduledChunk]) -> bool:
        """One-token chunks only, none scoring its prompt or asking for its hidden state (a graph returns
        logits), at most as many as the largest graph holds."""
        return len(chunks) <= self.max_rows and all(
            c.num_tokens == 1 and not c.seq.wants_prompt_logprobs and not c.seq.params.embed for c in chunks
        )

    def run(self, chunks: list[ScheduledChunk]) -> Tensor:
        """Logits [len(chunks), vocab] for each chunk's one token, whose K/V also goes into the cache."""
        block_size = self.cache.block_size
        needed = max(c.seq.num_computed_tokens // block_size + 1 for c in chunks)
        rows = next(r for r in self.row_buckets if r >= len(chunks))
        blocks = next(b for b in self.block_buckets if b >= needed)
        bucket = self._buckets[rows, blocks]
        width = needed if self.tables_read_in_place else blocks
        values = self._inputs(chunks, rows, width)
        if width == blocks:
            bucket.inputs.copy_(values)
        else:  # read in place: the columns past ``width`` are never read, so they keep an earlier step's blocks
            new_head, new_groups = self._layout(values.to(self.device), rows, width)
            head, groups = self._layout(bucket.inputs, rows, blocks)
            head.copy_(new_head)
            for (slots, tables), (new_slots, new_tables) in zip(groups, new_groups):
                slots.copy_(new_slots)
                tables[:, :width].copy_(new_tables)
        self.steps += 1
        if bucket.graph is not None and bucket.logits is not None:  # captured: both are set together
            bucket.graph.replay()
            logits = bucket.logits
        else:
            logits = self._forward(bucket)
        return logits[: len(chunks)]

    def _inputs(self, chunks: list[ScheduledChunk], rows: int, blocks: int) -> Tensor:
        block_size, scratch, pad = self.cache.block_size, self.scratch_block, rows - len(chunks)
        positions = [c.seq.num_computed_tokens for c in chunks]
        values = [c.seq.token_ids[p] for c, p in zip(chunks, positions)] + [0] * pad
        values += positions + [0] * pad
        values += [p + 1 for p in positions] + [1] * pad
        for group in range(self.cache.num_groups):
            tables = [c.seq.block_tables[group] for c in chunks]
            values += [t[p // block_size] * block_size + p % block_size for t, p in zip(tables, positions)]
            values += [scratch * block_size] * pad
            for table, pos in zip(tables, positions):
                used = [b if b >= 0 else scratch for b in table[: pos // block_size + 1]]  # -1: freed, masked out
                values += used + [scratch] * (blocks - len(used))
            values += [scratch] * (blocks * pad)
        return torch.tensor(values, dtype=torch.long)

    def _layout(self, flat: Tensor, rows: int, blocks: int) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        """Views of flat inputs: token ids, positions and context lens [3, rows], then per KV group the slots
        [rows] and the key blocks [rows, blocks]."""
        groups = []
        for group in range(self.cache.num_groups):
            slots = 3 * rows + group * rows * (blocks + 1)
            tables = flat[slots + rows : slots + rows * (blocks + 1)].view(rows, blocks)
            groups.append((flat[slots : slots + rows], tables))
        return flat[: 3 * rows].view(3, rows), groups

    def _padding(self, rows: int, blocks: int) -> Tensor:
        """Inputs of a batch made only of padding rows: valid to run, touching only the scratch block."""
        scratch_slot = self.scratch_block * self.cache.block_size
        group = [scratch_slot] * rows + [self.scratch_block] * (rows * blocks)
        return torch.tensor([0] * rows + [0] * rows + [1] * rows + group * self.cache.num_groups, dtype=torch.long)

    def _batch(self, bucket: _Bucket) -> ForwardBatch:
        """A ForwardBatch whose tensors are views of the bucket's static inputs. Built anew for every eager run
        and for the capture: an AttentionGroup caches its mask, which must be recomputed from the inputs."""
        rows = bucket.rows
        head, groups = self._layout(bucket.inputs, rows, bucket.blocks)
        ids, positions, context_lens = head
        every_row = torch.arange(rows, device=self.device)
        views = []
        for slots, key_blocks in groups:
            group = AttentionGroup(
                token_index=every_row,
                pad_index=every_row,
                num_seqs=rows,
                max_query=1,
                key_blocks=key_blocks,
                query_positions=positions.view(rows, 1),
                context_lens=context_lens,
                block_size=self.cache.block_size,
            )
            views.append(KVView([], slots, [group]))  # tables: only tensors are read
        return ForwardBatch(
            input_ids=ids,
            positions=positions,
            query_lens=[1] * rows,
            context_lens=[],  # per-step values live in the static inputs; the forward reads only tensors
            block_size=self.cache.block_size,
            views=views,
        )

    @torch.inference_mode()
    def _forward(self, bucket: _Bucket) -> Tensor:
        return self.model.compute_logits(self.model(self._batch(bucket), self.cache))

    def _capture(self, bucket: _Bucket, pool) -> None:
        """Warm up on a side stream (library handles, lazy inits), then record one forward."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._forward(bucket)
        torch.cuda.current_stream().wait_stream(side)
        bucket.graph = torch.cuda.CUDAGraph()
        # thread_local: engines of other models may be capturing in their own threads at the same time
        with torch.cuda.graph(bucket.graph, pool=pool, capture_error_mode="thread_local"):
            bucket.logits = self._forward(bucket)
