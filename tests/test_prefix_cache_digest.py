"""The prefix cache never serves a block whose tokens or prefix differ from the asker's, even when digests collide.

The real key is SHA-256 chained over the parent digest (collisions infeasible); these tests inject weak digests
to show that a hit is checked, not trusted.
"""

from __future__ import annotations

import hashlib

from server.engine.block_digest import root_digest, sha256_block_digest
from server.engine.block_manager import BlockManager
from server.engine.sampling_params import SamplingParams
from server.engine.sequence import Sequence

BLOCK = 4


def seq(tokens: list[int], cache_salt: str | None = None) -> Sequence:
    return Sequence("r", 0, list(tokens), len(tokens), SamplingParams(cache_salt=cache_salt), 0.0)


def prefill(manager: BlockManager, tokens: list[int], cache_salt: str | None = None) -> Sequence:
    """Admit a whole prompt in one chunk, which publishes its full blocks."""
    s = seq(tokens, cache_salt)
    assert manager.admit(s, token_budget=1000) == len(tokens) - s.num_computed_tokens
    return s


def constant_digest(parent: bytes, tokens) -> bytes:
    return b"every block collides"


def digest_ignoring_the_parent(parent: bytes, tokens) -> bytes:
    return hashlib.sha256(repr(tuple(tokens)).encode()).digest()


def test_colliding_digests_never_serve_another_prompts_block():
    manager = BlockManager(32, BLOCK, block_digest=constant_digest)
    prefill(manager, [1, 1, 1, 1, 2, 2, 2, 2, 9])
    assert manager.find_cached_prefix(seq([5, 5, 5, 5, 6, 6, 6, 6, 9])) == []
    assert manager.find_cached_prefix(seq([5, 5, 5, 5, 2, 2, 2, 2, 9])) == []


def test_a_block_with_equal_tokens_after_a_different_prefix_is_not_a_hit():
    manager = BlockManager(32, BLOCK, block_digest=digest_ignoring_the_parent)
    other = prefill(manager, [7, 7, 7, 7, 3, 3, 3, 3, 9])  # its first block is a legitimate hit below
    prefill(manager, [1, 1, 1, 1, 2, 2, 2, 2, 9])  # its second block collides with the asker's second
    asker = seq([7, 7, 7, 7, 2, 2, 2, 2, 9])
    assert manager.find_cached_prefix(asker) == other.block_table[:1]


def test_the_real_digest_is_sha256_chained_from_a_salted_root():
    tokens = [1, 2, 3, 4]
    first = sha256_block_digest(root_digest("model-a"), tokens)
    assert len(first) == 32
    assert first != sha256_block_digest(root_digest("model-b"), tokens)
    assert sha256_block_digest(first, tokens) != first  # the same tokens after a different prefix
    assert sha256_block_digest(root_digest("m"), [1, 2]) != sha256_block_digest(root_digest("m"), [1 << 16 | 2])


def test_equal_prompts_still_share_blocks():
    manager = BlockManager(32, BLOCK, salt="tiny")
    first = prefill(manager, [1, 1, 1, 1, 2, 2, 2, 2, 9])
    assert manager.find_cached_prefix(seq([1, 1, 1, 1, 2, 2, 2, 2, 3])) == first.block_table[:2]


def test_a_prefix_filled_by_two_sequences_at_once_stays_findable_whole():
    """A fills blocks 2-3 in one chunk while B, which found A's blocks 0-1, fills its own 2 and then 3: A's 3
    (computed after A's unpublished 2) must not take the key that B's findable 3 needs."""
    manager = BlockManager(32, BLOCK)
    prompt = list(range(1, 18))  # 4 full blocks and one token
    a = seq(prompt)
    assert manager.admit(a, token_budget=8) == 8
    a.num_computed_tokens += 8
    b = seq(prompt)
    assert manager.admit(b, token_budget=4) == 4 and b.block_table[:2] == a.block_table[:2]
    b.num_computed_tokens += 4
    manager.allocate(a, 8)
    manager.allocate(b, 4)
    assert manager.find_cached_prefix(seq(prompt)) == b.block_table[:4]


def test_a_cache_salt_shares_blocks_only_with_the_same_salt():
    manager = BlockManager(32, BLOCK, salt="tiny")
    prompt = [1, 1, 1, 1, 2, 2, 2, 2, 9]
    salted = prefill(manager, prompt, cache_salt="tenant-a")
    assert manager.find_cached_prefix(seq(prompt)) == []
    assert manager.find_cached_prefix(seq(prompt, "tenant-b")) == []
    assert manager.find_cached_prefix(seq(prompt, "tenant-a")) == salted.block_table[:2]
    unsalted = prefill(manager, prompt)
    assert manager.find_cached_prefix(seq(prompt)) == unsalted.block_table[:2]
    assert manager.find_cached_prefix(seq(prompt, "tenant-a")) == salted.block_table[:2]


def test_a_cache_salt_holds_even_when_digests_collide():
    """The first block keeps the root its chain starts from, so a salted request is never served an unsalted
    (or differently salted) block, whatever the digest."""
    manager = BlockManager(32, BLOCK, block_digest=digest_ignoring_the_parent)
    prompt = [1, 1, 1, 1, 2, 2, 2, 2, 9]
    prefill(manager, prompt, cache_salt="tenant-a")
    assert manager.find_cached_prefix(seq(prompt)) == []
    assert manager.find_cached_prefix(seq(prompt, "tenant-b")) == []
