"""The prefix cache's key for a block: SHA-256 chained over the parent block's digest and this block's tokens.

A 64-bit key (Python's ``hash``, the same in every process) lets a client search for a block that collides
with another client's and be served that client's KV; a 256-bit cryptographic digest makes that infeasible.
The chain starts from a root digest of the engine's salt, which names everything else that shapes the KV
(the model, its dtype), so blocks computed under one salt never match under another. A request's own
``cache_salt`` (vLLM's) starts its chain from a root of its own, so only requests that know the salt share its
blocks: no other client can learn from timing that it sent a prompt.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Sequence

BlockDigest = Callable[[bytes, Sequence[int]], bytes]  # (parent digest, the block's token ids) -> digest


def root_digest(salt: str) -> bytes:
    """The parent of every sequence's first block."""
    return hashlib.sha256(b"gptserve-prefix-v1\0" + salt.encode()).digest()


def salted_root(root: bytes, cache_salt: str | None) -> bytes:
    """The root of a request's chain: the engine's own, or one derived from it and the request's salt."""
    if cache_salt is None:
        return root
    return hashlib.sha256(root + b"cache_salt\0" + cache_salt.encode()).digest()


def sha256_block_digest(parent: bytes, tokens: Sequence[int]) -> bytes:
    """Fixed-width token ids after a fixed-width parent: the encoding of one block is never the encoding of another."""
    return hashlib.sha256(parent + struct.pack(f"<{len(tokens)}q", *tokens)).digest()
