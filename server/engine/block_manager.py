"""Which KV-cache blocks each sequence owns, per KV group, with prefix caching.

A block is free when no sequence references it. Free blocks sit in LRU order; a free block that still holds
a full, hashed run of tokens stays findable by its hash until it is handed out again, so a repeated prompt
or a shared system prompt reuses its KV instead of recomputing it. A block's key is a SHA-256 digest chained
over the block before it (server/engine/block_digest.py), so equal keys mean equal whole prefixes.

A hit is also checked, not trusted: each cached block keeps its own tokens and the block it was computed
after (a first block: the root its chain starts from, which a request's ``cache_salt`` changes), and a hit must
match both, so even a colliding digest can never serve one client another's KV (with
SHA-256 the check costs one comparison of a block's tokens per hit and never fails). The parent link stays
true because a parent is never handed out again before its children: every sequence holding a child holds
its parent, and frees the child first, so the LRU order evicts the child first. A block whose parent is not
itself published (two sequences filled the same prefix at once) is not published either.

KV groups (models/kv_cache.py): every group's blocks come from this one pool, and a sequence has one block
table per group, all of one length. The first group attends in full (GPT-2's only one). A sliding-window group
(GPT-OSS's every other layer) keeps only the blocks its queries can still see: blocks wholly before
``num_computed_tokens - window + 1`` are released when the sequence is next given blocks (their entries become
-1), so a decoding sequence holds at most ceil(window / block_size) + 1 of them; a prefill chunk of n tokens
holds up to ceil((window - 1 + n) / block_size) + 1, since its first query still sees the window before it.

Prefix caching covers every group (with it off for the sliding groups, no GPT-OSS hit could be used: the first
token left to compute needs its window's sliding KV). A sliding block is published with the full group's block
at its index as its parent: whoever holds the sliding block holds that one too, and releases the sliding block
first, so the parent rule above holds across groups. A hit of k blocks counts only while each sliding group
still has, cached, the blocks the first token left to compute can see; otherwise it is cut to the longest k
for which they do. Released sliding blocks stay findable, as any free block does, until handed out again.
"""

from __future__ import annotations

from collections import OrderedDict

from server.engine.block_digest import BlockDigest, root_digest, salted_root, sha256_block_digest
from server.engine.sequence import Sequence

FREED = -1  # a sliding-window group's table entry for a block released behind the window


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True, salt: str = "",
                 block_digest: BlockDigest = sha256_block_digest, windows: tuple[int | None, ...] = (None,)) -> None:
        if windows[0] is not None:
            raise ValueError("the first KV group must attend in full")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.windows = windows  # per KV group: its sliding window, None for full attention
        self.root = root_digest(salt)
        self.block_digest = block_digest
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.block_tokens: list[tuple[int, ...] | None] = [None] * num_blocks  # what a published block holds
        self.block_parent: list[int | None] = [None] * num_blocks  # the block it was computed after
        self.block_root: list[bytes | None] = [None] * num_blocks  # the root its digest chain starts from
        self.caches: list[dict[bytes, int]] = [{} for _ in windows]  # per group: prefix digest -> block
        self.free_blocks: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))

    @property
    def cached(self) -> dict[bytes, int]:
        """The full-attention group's published blocks."""
        return self.caches[0]

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    @property
    def num_used_blocks(self) -> int:
        """Blocks referenced by live sequences; cached blocks nobody holds count as free."""
        return self.num_blocks - len(self.free_blocks)

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        total = -(-(seq.num_computed_tokens + num_new_tokens) // self.block_size)
        return len(self.windows) * max(0, total - len(seq.block_table))

    def find_cached_prefix(self, seq: Sequence) -> list[int]:
        """Full-attention blocks of the longest cached run of ``seq``'s full blocks, always leaving one token to
        compute."""
        return self._prefix_hits(seq)[0]

    def _prefix_hits(self, seq: Sequence) -> list[list[int]]:
        """Each group's table for the longest prefix hit every group can serve."""
        if not self.enable_prefix_caching or seq.wants_prompt_logprobs:
            return [[] for _ in self.windows]  # prompt logprobs not yet scored need every prompt position computed
        full: list[int] = []
        for i in range((seq.num_tokens - 1) // self.block_size):
            block = self.caches[0].get(self._block_hash(seq, i))
            if block is None or not self._holds(block, seq, i, full[-1] if full else None):
                break
            full.append(block)
        while True:
            windowed = self._window_hits(seq, full)
            if windowed is not None:
                return [full, *windowed]
            full.pop()  # a sliding group lost a block the first token to compute would see

    def _window_hits(self, seq: Sequence, full: list[int]) -> list[list[int]] | None:
        """Each sliding group's table for a hit of ``full``: FREED up to the window of the first token left to
        compute, then its cached blocks; None if one of those is gone."""
        tables = []
        for group, window in enumerate(self.windows[1:], start=1):
            assert window is not None
            first = max(0, len(full) * self.block_size - window + 1) // self.block_size
            table = [FREED] * first
            for i in range(first, len(full)):
                block = self.caches[group].get(self._block_hash(seq, i))
                if block is None or not self._holds(block, seq, i, full[i]):
                    return None
                table.append(block)
            tables.append(table)
        return tables

    def _holds(self, block: int, seq: Sequence, i: int, parent: int | None) -> bool:
        """The cached ``block`` holds ``seq``'s i-th block: the same tokens, computed after ``parent`` (or, for
        a first block, chained from the same root)."""
        return (self.block_tokens[block] == self._tokens(seq, i) and self.block_parent[block] == parent
                and (i > 0 or self.block_root[block] == self._root(seq)))

    def admit(self, seq: Sequence, token_budget: int) -> int:
        """Attach ``seq``'s cached prefix and blocks for its next chunk; returns the chunk's token count, or 0
        (nothing taken) if the pool cannot hold even that now."""
        hits = self._prefix_hits(seq)
        start = len(hits[0]) * self.block_size
        num_new = min(seq.num_tokens - start, token_budget)
        new_blocks = len(self.windows) * (-(-(start + num_new) // self.block_size) - len(hits[0]))
        taken = [block for table in hits for block in table if block != FREED]
        if new_blocks > self.num_free_blocks - sum(1 for b in taken if self.ref_counts[b] == 0):
            return 0
        for block in taken:
            self._take(block)
        seq.block_tables = hits
        seq.num_computed_tokens = start
        seq.num_cached_tokens = start
        seq.num_published_blocks = len(hits[0])
        self.allocate(seq, num_new)
        return num_new

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.blocks_needed(seq, num_new_tokens) <= self.num_free_blocks + len(self._behind_window(seq))

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        """Release ``seq``'s blocks behind its windows, give it blocks for ``num_new_tokens`` more tokens and
        publish the hashes of blocks this step fills.

        Publishing before the forward is safe: a sequence that finds one of these blocks in the same step
        reads it in the same forward, where every layer writes the step's keys before any attention reads.
        """
        for group, i in self._behind_window(seq):
            self._release(seq.block_tables[group][i])
            seq.block_tables[group][i] = FREED
        if not seq.block_tables:
            seq.block_tables = [[] for _ in self.windows]
        for _ in range(self.blocks_needed(seq, num_new_tokens) // len(self.windows)):
            for table in seq.block_tables:
                block, _ = self.free_blocks.popitem(last=False)
                self._forget(block)
                self.ref_counts[block] = 1
                table.append(block)
        if self.enable_prefix_caching:
            self._publish_full_blocks(seq, seq.num_computed_tokens + num_new_tokens)

    def free(self, seq: Sequence) -> None:
        """Drop ``seq``'s references; its blocks become reusable, most recently used last (children, and the
        sliding groups' blocks, before their parents)."""
        for table in reversed(seq.block_tables):
            for block in reversed(table):
                if block != FREED:
                    self._release(block)
        seq.block_tables = []

    def withdraw_unfilled(self, seq: Sequence) -> None:
        """After a step given up part-way: unpublish the blocks it would have filled, which it left half-written."""
        filled = seq.num_computed_tokens // self.block_size
        for table in seq.block_tables:
            for block in table[filled : seq.num_published_blocks]:
                if block != FREED:
                    self._forget(block)
        seq.num_published_blocks = min(seq.num_published_blocks, filled)

    def forget(self, seq: Sequence) -> None:
        """Unpublish ``seq``'s blocks: after a failed step their contents cannot be trusted."""
        for table in seq.block_tables:
            for block in table:
                if block != FREED:
                    self._forget(block)

    def _behind_window(self, seq: Sequence) -> list[tuple[int, int]]:
        """(group, index) of each block ``seq`` still holds that no query from ``num_computed_tokens`` on sees."""
        behind = []
        for group, window in enumerate(self.windows[1:], start=1):
            assert window is not None
            table = seq.block_tables[group] if seq.block_tables else []
            i = min(max(0, seq.num_computed_tokens - window + 1) // self.block_size, len(table)) - 1
            while i >= 0 and table[i] != FREED:  # released blocks are always a leading run
                behind.append((group, i))
                i -= 1
        return behind

    def _take(self, block: int) -> None:
        if self.ref_counts[block] == 0:
            del self.free_blocks[block]
        self.ref_counts[block] += 1

    def _release(self, block: int) -> None:
        self.ref_counts[block] -= 1
        if self.ref_counts[block] == 0:
            self.free_blocks[block] = None

    def _forget(self, block: int) -> None:
        digest = self.block_hash[block]
        if digest is not None:
            for cache in self.caches:
                if cache.get(digest) == block:
                    del cache[digest]
        self.block_hash[block] = self.block_tokens[block] = self.block_parent[block] = None
        self.block_root[block] = None

    def _tokens(self, seq: Sequence, i: int) -> tuple[int, ...]:
        return tuple(seq.token_ids[i * self.block_size : (i + 1) * self.block_size])

    def _block_hash(self, seq: Sequence, i: int) -> bytes:
        """Chained digest of ``seq``'s i-th full block, computed once per sequence and kept on it."""
        while len(seq.block_hashes) <= i:
            j = len(seq.block_hashes)
            parent = seq.block_hashes[-1] if j else self._root(seq)
            seq.block_hashes.append(self.block_digest(parent, self._tokens(seq, j)))
        return seq.block_hashes[i]

    def _root(self, seq: Sequence) -> bytes:
        return salted_root(self.root, seq.params.cache_salt)

    def _publish_full_blocks(self, seq: Sequence, num_tokens_after_step: int) -> None:
        """A sliding group's block is published only beside its full-attention block: that block is its parent."""
        full = num_tokens_after_step // self.block_size
        root = self._root(seq) if seq.num_published_blocks < full else None
        for i in range(seq.num_published_blocks, full):
            block, digest = seq.block_table[i], self._block_hash(seq, i)
            parent = seq.block_table[i - 1] if i else None
            if parent is not None and self.block_hash[parent] is None:
                break  # its parent is not findable, so neither is it (nor anything after it)
            self._publish(block, digest, self._tokens(seq, i), parent, self.caches[0], root)
            if self.block_hash[block] is None:
                continue  # another block holds this prefix: the sliding blocks beside it are the ones to find
            for group in range(1, len(self.windows)):
                if seq.block_tables[group][i] != FREED:
                    self._publish(seq.block_tables[group][i], digest, self._tokens(seq, i), block, self.caches[group],
                                  root)
        seq.num_published_blocks = max(seq.num_published_blocks, full)

    def _publish(self, block: int, digest: bytes, tokens: tuple[int, ...], parent: int | None,
                 cache: dict[bytes, int], root: bytes | None) -> None:
        if self.block_hash[block] is None and digest not in cache:
            self.block_hash[block] = digest
            self.block_tokens[block] = tokens
            self.block_parent[block] = parent
            self.block_root[block] = root
            cache[digest] = block
