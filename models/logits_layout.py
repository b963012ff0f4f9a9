"""Store an unembedding matrix the way the logits matmul reads it fastest.

Logits are ``hidden [N, H] @ W.T`` with ``W`` [vocab, H]. When W's storage is laid out [H, vocab] (W being a
transposed view of it), the matmul streams the weight without a transposed access: for GPT-2-124M's 154 MB
tied embedding, batch-1 logits went from 12.0 to 6.9 ms on the 2-core CPU (bench/NOTES.md). Embedding
lookups read the same storage column-wise, which costs little for the few tokens of a step. Done once at
load, in place, so no second copy is kept.
"""

from __future__ import annotations

from torch import Tensor


def relayout_for_logits(weight: Tensor) -> None:
    """Make ``weight`` [vocab, H] a view of contiguous [H, vocab] storage, values unchanged."""
    weight.data = weight.data.T.contiguous().T
