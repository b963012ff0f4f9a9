"""The one input every model forward takes: a flat batch of tokens from many sequences.

The engine mixes prefill chunks and single decode tokens from different sequences in one call. Tokens of
one sequence are contiguous and in position order. Their keys and values are written to, and read from, a
paged cache: sequence i's j-th token lives in slot ``block_tables[i, j // block_size] * block_size +
j % block_size`` of the shared pool.

A grouped pool (models/kv_cache.py) gives each KV group its own block tables, so the batch has one view per
group: the slots its tokens write and the attention groups that read them. A sliding-window group's table
holds -1 for blocks already freed behind the window; attention never reads them (they are masked out, and
the decode kernels read only the window), so gathers read a live block of the same sequence in their place.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

Interrupt = Callable[[], bool]  # asked between layers: True gives the rest of the forward up


class ForwardInterrupted(Exception):
    """A forward stopped between layers because its ``interrupt`` said so: nothing it computed is to be used.

    Keys and values already written for the lower layers sit in slots the same tokens will overwrite when the
    step is run again, so giving a step up leaves the cache as if it had never started."""


def check_interrupt(interrupt: Interrupt | None) -> None:
    if interrupt is not None and interrupt():
        raise ForwardInterrupted


@dataclass(slots=True)
class AttentionGroup:
    """Sequences whose queries are padded together for one batched attention call.

    Decode tokens (one query each) share a group; every prefill chunk gets its own, so a long chunk never
    pads the decode queries to its length.
    """

    token_index: Tensor  # [n_tokens] rows of the flat batch that belong to this group
    pad_index: Tensor  # [n_tokens] where each of those rows lands in the [n_seqs * max_query] padded queries
    num_seqs: int
    max_query: int
    key_blocks: Tensor  # [n_seqs, max_blocks] cache blocks holding each sequence's keys, padded with a valid block
    query_positions: Tensor  # [n_seqs, max_query] position of each padded query (0 for padding)
    context_lens: Tensor  # [n_seqs]
    block_size: int
    first_query_position: int = 0  # the lowest position of any query in the group
    key_start: int = 0  # position of the first key ``key_blocks`` holds (a multiple of block_size)
    _masks: dict[int | None, Tensor] = field(default_factory=dict)
    _within: dict[int, AttentionGroup] = field(default_factory=dict)

    @property
    def num_key_positions(self) -> int:
        return self.key_blocks.shape[1] * self.block_size

    def within(self, window: int) -> AttentionGroup:
        """This group without the leading key blocks that no query sees through ``window``: a sliding layer's
        prefill chunk gathers about window + chunk keys, not the whole context. Made once per group and window."""
        if window not in self._within:
            skip = max(0, self.first_query_position - window + 1) // self.block_size
            self._within[window] = AttentionGroup(
                self.token_index, self.pad_index, self.num_seqs, self.max_query, self.key_blocks[:, skip:],
                self.query_positions, self.context_lens, self.block_size, self.first_query_position,
                self.key_start + skip * self.block_size)
        return self._within[window]

    def query_tiles(self, window: int | None, tile: int) -> list[tuple[slice, slice]]:
        """A one-sequence chunk's queries in runs of ``tile``, each with the range of held keys some query of it
        may see (causal, and through ``window``): attention over a run's keys alone is attention over all
        held keys under the mask, which hides the rest, at a fraction of the work for a long chunk."""
        if self.num_seqs != 1:
            raise ValueError("query tiles are a one-sequence chunk's")
        tiles = []
        for start in range(0, self.max_query, tile):
            end = min(start + tile, self.max_query)
            first, last = self.first_query_position + start, self.first_query_position + end - 1
            lowest = 0 if window is None else max(0, first - window + 1 - self.key_start)
            tiles.append((slice(start, end), slice(lowest, last + 1 - self.key_start)))
        return tiles

    def mask(self, window: int | None) -> Tensor:
        """[n_seqs, 1, max_query, keys held] True where a query may attend a key (causal, optional window)."""
        if window not in self._masks:
            key_pos = self.key_start + torch.arange(self.num_key_positions, device=self.key_blocks.device)
            q = self.query_positions.unsqueeze(-1)
            allowed = key_pos <= q
            if window is not None:
                allowed &= key_pos > q - window
            self._masks[window] = allowed.unsqueeze(1)
        return self._masks[window]


@dataclass(slots=True)
class KVView:
    """One KV group's side of a batch."""

    block_tables: list[list[int]]  # per sequence: its cache blocks in order (-1: freed behind the window)
    slot_mapping: Tensor  # [T] int64, cache slot that receives each token's K/V
    groups: list[AttentionGroup]


@dataclass(slots=True)
class ForwardBatch:
    input_ids: Tensor  # [T] int64
    positions: Tensor  # [T] int64, position of each token within its sequence
    query_lens: list[int]  # per sequence: tokens it has in this batch
    context_lens: list[int]  # per sequence: tokens in the cache once this batch is written (cached + new)
    block_size: int
    views: list[KVView] = field(default_factory=list)  # one per KV group of the pool

    @classmethod
    def build(
        cls,
        token_ids: list[list[int]],
        start_positions: list[int],
        block_tables: list[list[int]],
        block_size: int,
        device: torch.device | str = "cpu",
        group_tables: Sequence[list[list[int]]] = (),
    ) -> ForwardBatch:
        """Batch sequence i's ``token_ids[i]``, which sit at positions ``start_positions[i]`` onwards, with
        ``block_tables`` for the first KV group and ``group_tables`` for any further ones."""
        query_lens = [len(t) for t in token_ids]
        as_tensor = lambda xs: torch.tensor(xs, dtype=torch.long, device=device)  # noqa: E731
        batch = cls(
            input_ids=as_tensor([t for ids in token_ids for t in ids]),
            positions=as_tensor([p for s, n in zip(start_positions, query_lens) for p in range(s, s + n)]),
            query_lens=query_lens,
            context_lens=[s + n for s, n in zip(start_positions, query_lens)],
            block_size=block_size,
        )
        batch.views = [batch._view(tables, device) for tables in [block_tables, *group_tables]]
        return batch

    def view(self, kv_group: int) -> KVView:
        return self.views[kv_group]

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]

    @property
    def last_token_index(self) -> Tensor:
        """Row of each sequence's last token in the flat batch: where its next-token logits come from."""
        ends = torch.tensor(self.query_lens, device=self.input_ids.device).cumsum(0)
        return ends - 1

    def _view(self, block_tables: list[list[int]], device: torch.device | str) -> KVView:
        bs = self.block_size
        slots = [
            table[p // bs] * bs + p % bs
            for table, ctx, n in zip(block_tables, self.context_lens, self.query_lens)
            for p in range(ctx - n, ctx)
        ]
        starts = [0]
        for n in self.query_lens:
            starts.append(starts[-1] + n)
        decode = [i for i, n in enumerate(self.query_lens) if n == 1]
        prefill = [[i] for i, n in enumerate(self.query_lens) if n > 1]
        runs = ([decode] if decode else []) + prefill
        groups = [self._group(members, starts, block_tables, device) for members in runs]
        return KVView(block_tables, torch.tensor(slots, dtype=torch.long, device=device), groups)

    def _group(self, members: list[int], starts: list[int], block_tables: list[list[int]],
               device: torch.device | str) -> AttentionGroup:
        max_query = max(self.query_lens[i] for i in members)
        bs = self.block_size
        max_blocks = -(-max(self.context_lens[i] for i in members) // bs)
        token_index, pad_index, key_blocks, query_positions = [], [], [], []
        for row, i in enumerate(members):
            n, ctx = self.query_lens[i], self.context_lens[i]
            token_index.append(torch.arange(starts[i], starts[i] + n))
            pad_index.append(torch.arange(n) + row * max_query)
            used = block_tables[i][: -(-ctx // bs)]
            live = used[-1]  # stands in for padding and freed blocks: both are masked out
            key_blocks.append([b if b >= 0 else live for b in used] + [live] * (max_blocks - len(used)))
            qpos = torch.zeros(max_query, dtype=torch.long)
            qpos[:n] = torch.arange(ctx - n, ctx)
            query_positions.append(qpos)
        return AttentionGroup(
            token_index=torch.cat(token_index).to(device),
            pad_index=torch.cat(pad_index).to(device),
            num_seqs=len(members),
            max_query=max_query,
            key_blocks=torch.tensor(key_blocks, dtype=torch.long, device=device),
            query_positions=torch.stack(query_positions).to(device),
            context_lens=torch.tensor([self.context_lens[i] for i in members], device=device),
            block_size=bs,
            first_query_position=min(self.context_lens[i] - self.query_lens[i] for i in members),
        )
