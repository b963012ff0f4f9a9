"""Which KV-cache blocks each sequence owns, with prefix caching.

A block is free when no sequence references it. Free blocks sit in LRU order; a free block that still holds
a full, hashed run of tokens stays findable by its hash until it is handed out again, so a repeated prompt
or a shared system prompt reuses its KV instead of recomputing it. A block's key is a SHA-256 digest chained
over the block before it (server/engine/block_digest.py), so equal keys mean equal whole prefixes.

A hit is also checked, not trusted: each cached block keeps its own tokens and the block it was computed
after, and a hit must match both, so even a colliding digest can never serve one client another's KV (with
SHA-256 the check costs one comparison of a block's tokens per hit and never fails). The parent link stays
true because a parent is never handed out again before its children: every sequence holding a child holds
its parent, and frees the child first, so the LRU order evicts the child first. A block whose parent is not
itself published (two sequences filled the same prefix at once) is not published either.
"""

from __future__ import annotations

from collections import OrderedDict

from server.engine.block_digest import BlockDigest, root_digest, sha256_block_digest
from server.engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True, salt: str = "",
                 block_digest: BlockDigest = sha256_block_digest) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.root = root_digest(salt)
        self.block_digest = block_digest
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.block_tokens: list[tuple[int, ...] | None] = [None] * num_blocks  # what a published block holds
        self.block_parent: list[int | None] = [None] * num_blocks  # the block it was computed after
        self.cached: dict[bytes, int] = {}  # prefix digest -> block
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
        if not self.enable_prefix_caching or seq.wants_prompt_logprobs:
            return []  # prompt logprobs not yet scored need every prompt position computed
        blocks: list[int] = []
        for i in range((seq.num_tokens - 1) // self.block_size):
            block = self.cached.get(self._block_hash(seq, i))
            if block is None or not self._holds(block, seq, i, blocks[-1] if blocks else None):
                break
            blocks.append(block)
        return blocks

    def _holds(self, block: int, seq: Sequence, i: int, parent: int | None) -> bool:
        """The cached ``block`` holds ``seq``'s i-th block: the same tokens, computed after ``parent``."""
        return self.block_tokens[block] == self._tokens(seq, i) and self.block_parent[block] == parent

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
        self.block_hash[block] = self.block_tokens[block] = self.block_parent[block] = None

    def _tokens(self, seq: Sequence, i: int) -> tuple[int, ...]:
        return tuple(seq.token_ids[i * self.block_size : (i + 1) * self.block_size])

    def _block_hash(self, seq: Sequence, i: int) -> bytes:
        """Chained digest of ``seq``'s i-th full block, computed once per sequence and kept on it."""
        while len(seq.block_hashes) <= i:
            j = len(seq.block_hashes)
            parent = seq.block_hashes[-1] if j else self.root
            seq.block_hashes.append(self.block_digest(parent, self._tokens(seq, j)))
        return seq.block_hashes[i]

    def _publish_full_blocks(self, seq: Sequence, num_tokens_after_step: int) -> None:
        full = num_tokens_after_step // self.block_size
        for i in range(seq.num_published_blocks, full):
            block, digest = seq.block_table[i], self._block_hash(seq, i)
            parent = seq.block_table[i - 1] if i else None
            if parent is not None and self.block_hash[parent] is None:
                break  # its parent is not findable, so neither is it (nor anything after it)
            if self.block_hash[block] is None and digest not in self.cached:
                self.block_hash[block] = digest
                self.block_tokens[block] = self._tokens(seq, i)
                self.block_parent[block] = parent
                self.cached[digest] = block
        seq.num_published_blocks = max(seq.num_published_blocks, full)
