"""Which KV-cache blocks each sequence owns, with prefix caching.

A block is free when no sequence references it. Free blocks sit in LRU order; a free block that still holds
a full, hashed run of tokens stays findable by its hash until it is handed out again, so a repeated prompt
or a shared system prompt reuses its KV instead of recomputing it. The hash of a block chains the hash of
the block before it, so equal hashes mean equal whole prefixes.
"""

from __future__ import annotations

from collections import OrderedDict

from server.engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.cached: dict[int, int] = {}  # prefix hash -> block
        self.free_blocks: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    @property
    def num_used_blocks(self) -> int:
        """Blocks referenced by live sequences; cached blocks nobody holds count as free."""
        return self.num_blocks - len(self.free_blocks)

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        total = -(-(seq.num_computed_tokens + num_new_tokens) // self.block_size)
        return max(0, total - len(seq.block_table))

    def find_cached_prefix(self, seq: Sequence) -> list[int]:
        """Blocks holding the longest cached run of ``seq``'s full blocks, always leaving one token to compute."""
        if not self.enable_prefix_caching or seq.params.prompt_logprobs is not None:
            return []  # prompt logprobs need every prompt position computed
        blocks: list[int] = []
        for i in range((seq.num_tokens - 1) // self.block_size):
            block = self.cached.get(self._block_hash(seq, i))
            if block is None:
                break
            blocks.append(block)
        return blocks

    def admit(self, seq: Sequence, token_budget: int) -> int:
        """Attach ``seq``'s cached prefix and blocks for its next chunk; returns the chunk's token count, or 0
        (nothing taken) if the pool cannot hold even that now."""
        hits = self.find_cached_prefix(seq)
        start = len(hits) * self.block_size
        num_new = min(seq.num_tokens - start, token_budget)
        new_blocks = -(-(start + num_new) // self.block_size) - len(hits)
        if new_blocks > self.num_free_blocks - sum(1 for b in hits if self.ref_counts[b] == 0):
            return 0
        for block in hits:
            self._take(block)
        seq.block_table = list(hits)
        seq.num_computed_tokens = start
        seq.num_cached_tokens = start
        seq.num_published_blocks = len(hits)
        self.allocate(seq, num_new)
        return num_new

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.blocks_needed(seq, num_new_tokens) <= self.num_free_blocks

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        """Give ``seq`` blocks for ``num_new_tokens`` more tokens and publish the hashes of blocks this step fills.

        Publishing before the forward is safe: a sequence that finds one of these blocks in the same step
        reads it in the same forward, where every layer writes the step's keys before any attention reads.
        """
        for _ in range(self.blocks_needed(seq, num_new_tokens)):
            block, _ = self.free_blocks.popitem(last=False)
            self._forget(block)
            self.ref_counts[block] = 1
            seq.block_table.append(block)
        if self.enable_prefix_caching:
            self._publish_full_blocks(seq, seq.num_computed_tokens + num_new_tokens)

    def free(self, seq: Sequence) -> None:
        """Drop ``seq``'s references; its blocks become reusable, most recently used last."""
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free_blocks[block] = None
        seq.block_table = []

    def withdraw_unfilled(self, seq: Sequence) -> None:
        """After a step given up part-way: unpublish the blocks it would have filled, which it left half-written."""
        filled = seq.num_computed_tokens // self.block_size
        for block in seq.block_table[filled : seq.num_published_blocks]:
            self._forget(block)
        seq.num_published_blocks = min(seq.num_published_blocks, filled)

    def forget(self, seq: Sequence) -> None:
        """Unpublish ``seq``'s blocks: after a failed step their contents cannot be trusted."""
        for block in seq.block_table:
            self._forget(block)

    def _take(self, block: int) -> None:
        if self.ref_counts[block] == 0:
            del self.free_blocks[block]
        self.ref_counts[block] += 1

    def _forget(self, block: int) -> None:
        digest = self.block_hash[block]
        if digest is not None and self.cached.get(digest) == block:
            del self.cached[digest]
        self.block_hash[block] = None

    def _block_hash(self, seq: Sequence, i: int) -> int:
        """Chained hash of ``seq``'s i-th full block, computed once per sequence and kept on it."""
        while len(seq.block_hashes) <= i:
            j = len(seq.block_hashes)
            parent = seq.block_hashes[-1] if j else None
            tokens = tuple(seq.token_ids[j * self.block_size : (j + 1) * self.block_size])
            seq.block_hashes.append(hash((parent, tokens)))
        return seq.block_hashes[i]

    def _publish_full_blocks(self, seq: Sequence, num_tokens_after_step: int) -> None:
        full = num_tokens_after_step // self.block_size
        for i in range(seq.num_published_blocks, full):
            block, digest = seq.block_table[i], self._block_hash(seq, i)
            if self.block_hash[block] is None and digest not in self.cached:
                self.block_hash[block] = digest
                self.cached[digest] = block
        seq.num_published_blocks = max(seq.num_published_blocks, full)
