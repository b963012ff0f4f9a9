"""Rank 0 tells the other tensor-parallel ranks what to run, as two small integer tensors per message.

A header int64[4] = [command, a, b, c] on the control group, then for a step a payload int32 on the data
group: [query_lens | context_lens | block-table lengths | input_ids | block-table entries]. From it every
rank rebuilds the same ForwardBatch (positions, slots, attention groups) that rank 0 built. The whole batch
is sent every step rather than vLLM's per-step differences: it costs (3 S + T + B) * 4 bytes for S sequences,
T tokens and B block-table entries, e.g. 35 KB for 64 sequences decoding at 2k context in 16-token blocks,
and keeps the workers stateless between steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from models.forward_batch import ForwardBatch
from server.engine.tp_group import RankContext

STOP, SETUP, STEP = 0, 1, 2


@dataclass(frozen=True, slots=True)
class CacheGeometry:
    num_blocks: int
    block_size: int


class StepChannel:
    def __init__(self, ctx: RankContext) -> None:
        self.ctx = ctx

    # -- rank 0 ---------------------------------------------------------------------------------------------
    def send_setup(self, geometry: CacheGeometry) -> None:
        """Every rank allocates its KV shard with rank 0's geometry; returns once all have."""
        self._send_header(SETUP, geometry.num_blocks, geometry.block_size, 0)
        dist.barrier(group=self.ctx.control)

    def send_step(self, batch: ForwardBatch) -> None:
        bs = batch.block_size
        # the used blocks of the one KV group a split model's pool has (GptOss.kv_cache_spec)
        tables = [table[: -(-ctx // bs)] for table, ctx in zip(batch.view(0).block_tables, batch.context_lens)]
        self._send_header(STEP, len(batch.query_lens), batch.num_tokens, sum(len(t) for t in tables))
        meta = torch.tensor(batch.query_lens + batch.context_lens + [len(t) for t in tables], dtype=torch.int32)
        entries = torch.tensor([b for t in tables for b in t], dtype=torch.int32)
        payload = torch.cat([meta, batch.input_ids.cpu().int(), entries]).to(self.ctx.device)
        dist.broadcast(payload, src=0, group=self.ctx.tp.group)

    def send_stop(self) -> None:
        self._send_header(STOP, 0, 0, 0)

    def _send_header(self, command: int, a: int, b: int, c: int) -> None:
        dist.broadcast(torch.tensor([command, a, b, c], dtype=torch.int64), src=0, group=self.ctx.control)

    # -- other ranks ----------------------------------------------------------------------------------------
    def receive(self, block_size: int) -> ForwardBatch | CacheGeometry | None:
        """The next message: a batch to run, the KV geometry to allocate, or None to stop."""
        header = torch.empty(4, dtype=torch.int64)
        dist.broadcast(header, src=0, group=self.ctx.control)
        command, a, b, c = header.tolist()
        if command == STOP:
            return None
        if command == SETUP:
            return CacheGeometry(a, b)
        payload = torch.empty(3 * a + b + c, dtype=torch.int32, device=self.ctx.device)
        dist.broadcast(payload, src=0, group=self.ctx.tp.group)
        return self._batch(payload.tolist(), a, b, block_size)

    def setup_done(self) -> None:
        dist.barrier(group=self.ctx.control)

    def _batch(self, values: list[int], num_seqs: int, num_tokens: int, block_size: int) -> ForwardBatch:
        query_lens, context_lens = values[:num_seqs], values[num_seqs : 2 * num_seqs]
        table_lens = values[2 * num_seqs : 3 * num_seqs]
        ids, entries = values[3 * num_seqs : 3 * num_seqs + num_tokens], values[3 * num_seqs + num_tokens :]
        token_ids, tables, t, e = [], [], 0, 0
        for q, n in zip(query_lens, table_lens):
            token_ids.append(ids[t : t + q])
            tables.append(entries[e : e + n])
            t, e = t + q, e + n
        starts = [ctx - q for ctx, q in zip(context_lens, query_lens)]
        return ForwardBatch.build(token_ids, starts, tables, block_size, self.ctx.device)
