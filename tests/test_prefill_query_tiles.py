"""A long prefill chunk attended a tile of queries at a time (models/attention.py's tiled_attention), each tile
over only the keys its queries may see: the same as one masked call over all held keys, and GPT-OSS's logits
through it as transformers'."""

from __future__ import annotations

import pytest
import torch

import models.attention as attention
from models.forward_batch import ForwardBatch
from models.loader import load_model
from tests.test_gpt_oss import checkpoint_dir, full_forward, oracle, oracle_logits, random_tokens  # noqa: F401

BLOCK = 4


def chunk(length: int, start: int) -> ForwardBatch:
    """One sequence's chunk of ``length`` tokens from position ``start`` (its earlier keys already cached)."""
    blocks = -(-(start + length) // BLOCK)
    table = list(range(blocks))[::-1]  # blocks out of order in the pool
    return ForwardBatch.build([[7] * length], [start], [table], BLOCK)


def attend(batch: ForwardBatch, window, sinks, heads: int, kv_heads: int, tile: int, monkeypatch) -> torch.Tensor:
    torch.manual_seed(0)
    head_dim, slots = 16, 64 * BLOCK
    cache = (torch.randn(slots, kv_heads, head_dim), torch.randn(slots, kv_heads, head_dim))
    q = torch.randn(batch.num_tokens, heads, head_dim)
    k, v = torch.randn(batch.num_tokens, kv_heads, head_dim), torch.randn(batch.num_tokens, kv_heads, head_dim)
    monkeypatch.setattr(attention, "QUERY_TILE", tile)
    return attention.paged_attention(q, k, v, cache, batch.view(0), window=window, sinks=sinks)


@pytest.mark.parametrize("length,start", [(37, 0), (40, 23), (9, 50)])
@pytest.mark.parametrize("window", [None, 5, 12])
@pytest.mark.parametrize("with_sinks", [False, True])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2)])
def test_tiles_attend_as_one_masked_call(monkeypatch, length, start, window, with_sinks, heads, kv_heads):
    """Chunks from the first position and over a cached prefix, tiles of 4 and 7 queries (the last one short),
    full and sliding layers (a window shorter and longer than a tile), with and without sinks, grouped heads."""
    sinks = torch.randn(heads) if with_sinks else None
    args = (chunk(length, start), window, sinks, heads, kv_heads)
    whole = attend(*args, tile=1 << 20, monkeypatch=monkeypatch)
    for tile in (4, 7):
        torch.testing.assert_close(attend(*args, tile=tile, monkeypatch=monkeypatch), whole, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [None, 3, 10])
def test_each_tile_holds_exactly_the_keys_its_queries_may_see(window):
    group = chunk(30, 19).view(0).groups[0]
    if window is not None:
        group = group.within(window)
    mask = group.mask(window)[0, 0]
    tiles = group.query_tiles(window, 8)
    assert [q.start for q, _ in tiles] == [0, 8, 16, 24] and tiles[-1][0].stop == 30
    for queries, keys in tiles:
        seen = mask[queries].any(dim=0).nonzero().flatten()
        assert (keys.start, keys.stop) == (seen.min().item(), seen.max().item() + 1)
    with pytest.raises(ValueError, match="one-sequence chunk"):
        ForwardBatch.build([[1], [2]], [3, 4], [[0, 1], [2, 3]], BLOCK).view(0).groups[0].query_tiles(None, 8)


def test_gpt_oss_logits_through_tiles_match_transformers(monkeypatch, checkpoint_dir, oracle):  # noqa: F811
    """Five sliding windows' worth of prompt in tiles of 6 queries: every layer, sliding and full, attends tile
    by tile."""
    monkeypatch.setattr(attention, "QUERY_TILE", 6)
    calls: list[int] = []
    real = attention.masked_attention
    monkeypatch.setattr(attention, "masked_attention", lambda q, *a: calls.append(q.shape[2]) or real(q, *a))
    model = load_model(checkpoint_dir, dtype="float32", device="cpu").model
    ids = random_tokens(40, seed=3)
    ours, theirs = full_forward(model, ids), oracle_logits(oracle, ids)
    assert (ours - theirs).abs().max().item() <= 1e-4
    assert calls and max(calls) == 6
