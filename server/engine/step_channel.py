"""Rank 0 tells the other tensor-parallel ranks what to run, as two small integer tensors per message.

A header int64[4] = [command, a, b, c] on the control group, then for a step a payload int32 on the data
group: [query_lens | context_lens | block-table lengths, group by group | input_ids | block-table entries,
group by group]. From it every rank rebuilds the same ForwardBatch (positions, slots, attention groups, one
view per KV group: GPT-OSS's sliding layers keep their own tables, -1 where a block was freed) that rank 0
built. The whole batch is sent every step rather than vLLM's per-step differences: it costs
(2 S + G S + T + B) * 4 bytes for S sequences, G KV groups, T tokens and B block-table entries, e.g. 35 KB
for 64 sequences decoding at 2k context in 16-token blocks, and keeps the workers stateless between steps.
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
    grouped: bool  # one pool tensor per layer of the larger KV group (models/kv_cache.py)


def step_payload(batch: ForwardBatch) -> list[int]:
    """The batch as the int32 values a step message carries (the module docstring gives the layout)."""
    bs = batch.block_size
    tables = [[table[: -(-ctx // bs)] for table, ctx in zip(view.block_tables, batch.context_lens)]
              for view in batch.views]  # the used blocks of each sequence, in each KV group
    lengths = [len(t) for group in tables for t in group]
    entries = [b for group in tables for t in group for b in t]
    return batch.query_lens + batch.context_lens + lengths + batch.input_ids.tolist() + entries


def batch_from_payload(values: list[int], num_seqs: int, num_tokens: int, num_groups: int, block_size: int,
                       device: torch.device | str) -> ForwardBatch:
    """What ``step_payload`` made, back as a ForwardBatch built as rank 0 built it."""
    query_lens, context_lens = values[:num_seqs], values[num_seqs : 2 * num_seqs]
    end_of_lengths = (2 + num_groups) * num_seqs
    table_lens = values[2 * num_seqs : end_of_lengths]
    ids, entries = values[end_of_lengths : end_of_lengths + num_tokens], values[end_of_lengths + num_tokens :]
    token_ids, t = [], 0
    for q in query_lens:
        token_ids.append(ids[t : t + q])
        t += q
    tables: list[list[list[int]]] = [[] for _ in range(num_groups)]
    e = 0
    for index, n in enumerate(table_lens):
        tables[index // num_seqs].append(entries[e : e + n])
        e += n
    starts = [ctx - q for ctx, q in zip(context_lens, query_lens)]
    return ForwardBatch.build(token_ids, starts, tables[0], block_size, device, group_tables=tables[1:])


class StepChannel:
    def __init__(self, ctx: RankContext) -> None:
        self.ctx = ctx

    # -- rank 0 ---------------------------------------------------------------------------------------------
    def send_setup(self, geometry: CacheGeometry) -> None:
        """Every rank allocates its KV shard with rank 0's geometry; returns once all have."""
        self._send_header(SETUP, geometry.num_blocks, geometry.block_size, int(geometry.grouped))
        dist.barrier(group=self.ctx.control)

    def send_step(self, batch: ForwardBatch) -> None:
        payload = torch.tensor(step_payload(batch), dtype=torch.int32)
        self._send_header(STEP, len(batch.query_lens), batch.num_tokens, len(payload))
        dist.broadcast(payload.to(self.ctx.device), src=0, group=self.ctx.tp.group)

    def send_stop(self) -> None:
        self._send_header(STOP, 0, 0, 0)

    def _send_header(self, command: int, a: int, b: int, c: int) -> None:
        dist.broadcast(torch.tensor([command, a, b, c], dtype=torch.int64), src=0, group=self.ctx.control)

    # -- other ranks ----------------------------------------------------------------------------------------
    def receive(self, block_size: int, num_groups: int) -> ForwardBatch | CacheGeometry | None:
        """The next message: a batch to run (over ``num_groups`` KV groups), the KV geometry to allocate, or None
        to stop."""
        header = torch.empty(4, dtype=torch.int64)
        dist.broadcast(header, src=0, group=self.ctx.control)
        command, a, b, c = header.tolist()
        if command == STOP:
            return None
        if command == SETUP:
            return CacheGeometry(a, b, bool(c))
        payload = torch.empty(c, dtype=torch.int32, device=self.ctx.device)
        dist.broadcast(payload, src=0, group=self.ctx.tp.group)
        return batch_from_payload(payload.tolist(), a, b, num_groups, block_size, self.ctx.device)

    def setup_done(self) -> None:
        dist.barrier(group=self.ctx.control)
