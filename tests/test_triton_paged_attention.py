"""The Triton paged attention (the CUDA attention path) against attention computed by hand.

On a machine without a GPU the kernel runs under Triton's interpreter (``TRITON_INTERPRET=1``, which
tests/conftest.py sets for CPU runs); with ``--device cuda`` it is compiled and run on the GPU. Each case draws
a pool, block tables whose blocks are scattered through it, ragged contexts, decode rows (one query a sequence)
or chunks of queries over a cached prefix, and the head layouts the models use (GPT-2's 12 heads of their own,
GPT-OSS's 8 query heads to a KV head). Then both models' mixed prefill and decode batches run with every
decode row through the kernel (what CUDA sends it), against transformers.
"""

from __future__ import annotations

import importlib
import os
import random
from types import SimpleNamespace

import pytest
import torch

import models.attention as attention
from models.gpt2 import load_gpt2
from models.gpt_oss import load_gpt_oss
from models.kv_cache import PagedKVCache
from models.testing.gpt_oss_checkpoint import write_tiny_gpt_oss
from server.engine.decode_graphs import DecodeGraphs
from tests.gpt_oss_oracle import transformers_gpt_oss
from tests.test_gpt2 import test_paged_decode_matches_full_forward_for_mixed_batch as gpt2_mixed_batches
from tests.test_gpt_oss import (
    SLIDING_WINDOW,
    test_paged_prefill_and_decode_in_mixed_batches_match_full_forward as gpt_oss_mixed_batches,
)
from tests.test_gpt_oss_compile import decode_chunks
from tests.test_paged_decode_kernels import reference_attention


@pytest.fixture(scope="module")
def kernel(device: torch.device):
    """The kernel's module: compiled on CUDA, interpreted on CPU (tests/conftest.py sets TRITON_INTERPRET)."""
    pytest.importorskip("triton")
    if device.type == "cpu":
        assert os.environ.get("TRITON_INTERPRET") == "1", "Triton would compile for a GPU this machine lacks"
    return importlib.import_module("models.triton_paged_attention")


class Case:
    """A pool of 128 blocks and a block table per sequence: block t of sequence s holds positions [tB, tB + B)."""

    def __init__(self, contexts: list[int], block_size: int, kv_heads: int, head_dim: int, pool_dtype, device,
                 seed: int) -> None:
        rng = random.Random(seed)
        free = list(range(128))
        rng.shuffle(free)
        width = max(-(-n // block_size) for n in contexts)
        tables = [[free.pop() for _ in range(-(-n // block_size))] for n in contexts]
        self.block_size = block_size
        self.key_blocks = torch.tensor([t + [t[0]] * (width - len(t)) for t in tables], device=device)
        self.context_lens = torch.tensor(contexts, device=device)
        g = torch.Generator().manual_seed(seed)
        shape = (128 * block_size, kv_heads, head_dim)
        self.keys = torch.randn(shape, generator=g).to(device=device, dtype=pool_dtype)
        self.values = torch.randn(shape, generator=g).to(device=device, dtype=pool_dtype)

    def expected(self, q, query_lens: list[int], window: int, sinks):
        """Attention by hand in float64 (tests/test_paged_decode_kernels.py), on the CPU, for q [S, Q, H, D]
        whose sequence s has query_lens[s] queries at its last positions: each query is attended as the last
        token of a context that ends at it. Padding rows come back as zeros."""
        rows = [(s, i) for s, n in enumerate(query_lens) for i in range(n)]
        ends = [int(self.context_lens[s]) - query_lens[s] + i + 1 for s, i in rows]
        each = SimpleNamespace(context_lens=torch.tensor(ends), key_blocks=self.key_blocks.cpu()[[s for s, _ in rows]])
        sinks = sinks.cpu() if sinks is not None else torch.full((q.shape[2],), float("-inf"))
        flat = reference_attention(torch.stack([q[s, i].float().cpu() for s, i in rows]), self.keys.float().cpu(),
                                   self.values.float().cpu(), each, window or None, sinks, self.block_size)
        out = torch.zeros(q.shape, dtype=torch.float32)
        for (s, i), value in zip(rows, flat):
            out[s, i] = value
        return out

    def attend(self, kernel, q, query_lens: list[int], window: int, sinks, scale: float):
        """The kernel over q [S, Q, H, D], in q's dtype; padding rows zeroed as the reference leaves them."""
        starts = torch.tensor([int(c) - n for c, n in zip(self.context_lens, query_lens)], device=q.device)
        got = kernel.paged_attention(q, self.keys, self.values, self.key_blocks, self.context_lens, starts[:, None],
                                     self.block_size, window, scale, sinks)
        assert got.dtype == q.dtype
        got = got.float().cpu()
        for s, n in enumerate(query_lens):
            got[s, n:] = 0
        return got


CONTEXTS = [1, 15, 16, 17, 33, 100]
QUERY_LAYOUTS = {
    "decode": [1] * len(CONTEXTS),  # one query a sequence: a decode group
    "chunks": [1, 15, 3, 17, 33, 40],  # whole prompts, chunks over a cached prefix, a ragged group past a tile
}


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(12, 12, 64), (16, 2, 64), (6, 3, 24)])
@pytest.mark.parametrize("window,with_sinks,block_size", [(0, False, 16), (40, False, 16), (5, True, 4), (0, True, 4)])
@pytest.mark.parametrize("layout", QUERY_LAYOUTS)
def test_float32_matches_attention_by_hand(kernel, device, heads, kv_heads, head_dim, window, with_sinks, block_size,
                                           layout):
    """IEEE float32 throughout: within float32 rounding of the float64 answer, at any block size and head dim,
    every query seeing the keys up to its own position (through its window)."""
    case = Case(CONTEXTS, block_size, kv_heads, head_dim, torch.float32, device, seed=heads + window + block_size)
    query_lens = QUERY_LAYOUTS[layout]
    g = torch.Generator().manual_seed(1)
    q = torch.randn(len(CONTEXTS), max(query_lens), heads, head_dim, generator=g).to(device)
    sinks = torch.randn(heads, generator=g).to(device) if with_sinks else None
    got = case.attend(kernel, q, query_lens, window, sinks, head_dim**-0.5)
    torch.testing.assert_close(got, case.expected(q, query_lens, window, sinks), atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("q_dtype,pool_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16),
                                                (torch.float16, torch.float16)])
def test_narrow_pools_and_queries_at_gpt_oss_heads(kernel, device, q_dtype, pool_dtype):
    """GPT-OSS's layout (64 query heads on 8 KV heads, sinks, a 128-token window beside a full layer), decode rows
    and a 20-query chunk past the window: a float32 query over a bf16 pool is exact to float32 after the
    widening; 16-bit queries to their own rounding."""
    case = Case([1, 77, 129, 300], 16, 8, 64, pool_dtype, device, seed=3)
    g = torch.Generator().manual_seed(2)
    sinks = torch.randn(64, generator=g).to(device)
    tolerance = 2e-6 if q_dtype == torch.float32 else 2e-2
    for query_lens in ([1, 1, 1, 1], [1, 2, 1, 20]):
        q = torch.randn(4, max(query_lens), 64, 64, generator=g).to(device=device, dtype=q_dtype)
        for window in (0, 128):
            got = case.attend(kernel, q, query_lens, window, sinks, 0.125)
            torch.testing.assert_close(got, case.expected(q, query_lens, window, sinks), atol=tolerance,
                                       rtol=tolerance)


@pytest.mark.parametrize("query_lens", [[1], [9]])
def test_blocks_outside_the_window_are_never_read(kernel, device, query_lens):
    """A sliding layer frees the blocks every window has passed; their table entries may point anywhere (here
    past the pool's end). Only the windows' blocks are read, so the answer is as if they were valid: for one
    query (window from 50) and for a chunk of 9 at positions 61-69 (the first query's window from 42)."""
    case = Case([70], 16, 2, 32, torch.float32, device, seed=5)
    q = torch.randn(1, query_lens[0], 4, 32).to(device)
    expected = case.expected(q, query_lens, 20, None)
    case.key_blocks[0, :2] = 10**9  # positions 0-31
    got = case.attend(kernel, q, query_lens, 20, None, 32**-0.5)
    torch.testing.assert_close(got, expected, atol=2e-6, rtol=2e-6)


def test_a_pool_that_does_not_fit_the_queries_is_refused(kernel, device):
    keys, q = torch.randn(64, 3, 16, device=device), torch.randn(1, 1, 4, 16, device=device)
    blocks, lens = torch.zeros(1, 4, dtype=torch.long, device=device), torch.ones(1, dtype=torch.long, device=device)
    with pytest.raises(ValueError, match="does not fit"):
        kernel.paged_attention(q, keys, keys, blocks, lens, lens[:, None] - 1, 16, 0, 1.0, None)


@pytest.fixture
def attention_through_triton(kernel, monkeypatch):
    """Decode groups take the Triton kernel whatever the device (on CPU, interpreted), as they do on CUDA."""
    monkeypatch.setattr(attention, "decode_kernels_apply", lambda _q: False)
    monkeypatch.setattr(attention, "triton_attention_applies", lambda _device: True)


def test_gpt2_attends_through_the_kernel_as_transformers_does(attention_through_triton, tiny_gpt2_dir, device):
    """GPT-2's mixed prefill and decode batches (tests/test_gpt2.py), every decode row through the kernel."""
    from transformers import GPT2LMHeadModel

    oracle = GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir, attn_implementation="eager", dtype=torch.float32)
    gpt2_mixed_batches(load_gpt2(tiny_gpt2_dir, torch.float32, device), oracle.to(device).eval(), device)


def test_gpt_oss_attends_through_the_kernel_as_transformers_does(attention_through_triton, device, tmp_path):
    """GPT-OSS's (tests/test_gpt_oss.py): sliding-window layers beside full ones, sinks, 8 query heads a KV head."""
    checkpoint = write_tiny_gpt_oss(tmp_path, layout="hf", sliding_window=SLIDING_WINDOW)
    gpt_oss_mixed_batches(load_gpt_oss(checkpoint, torch.float32, device), transformers_gpt_oss(checkpoint))


def test_decode_graph_inputs_attend_through_the_kernel_as_through_the_gather(kernel, monkeypatch, device, tmp_path):
    """What a captured CUDA decode step feeds the kernel: DecodeGraphs' static inputs, rows padded to the bucket
    on the scratch block, tables padded to the bucket's width, with GPT-OSS's statically routed forward (what is
    captured; run eagerly on CPU): the same logits through the kernel as through the gather and SDPA. Through the
    kernel there is one table width, and a step writes only the columns its longest context needs: the last
    step's shorter contexts leave the earlier steps' blocks in the columns past them, which must not be read."""
    model = load_gpt_oss(write_tiny_gpt_oss(tmp_path, layout="hf", sliding_window=4), torch.float32, device)
    model.use_static_routing()
    monkeypatch.setattr(attention, "decode_kernels_apply", lambda _q: False)

    def decode_steps(through_kernel: bool) -> list[torch.Tensor]:
        """Three steps over a cache of random keys and values (the same each time), the attention path chosen
        before the graphs are built (CUDA captures them then): 3 of the bucket's 4 rows, contexts past the
        window of 4, then 2 rows of short contexts."""
        monkeypatch.setattr(attention, "triton_attention_applies", lambda _device: through_kernel)
        cache = PagedKVCache(model.kv_cache_spec(), 13, 4, device=device)  # block 12: the scratch block
        g = torch.Generator().manual_seed(0)
        for pool in cache.keys + cache.values:
            pool.copy_(torch.randn(pool.shape, generator=g) * 4)
        graphs = DecodeGraphs(model, cache, max_rows=4, max_blocks=4, scratch_block=12)
        assert graphs.block_buckets == ([4] if through_kernel else [1, 2, 4])
        return [graphs.run(decode_chunks(contexts, seed=step)).clone()
                for step, contexts in enumerate([[5, 9, 1], [6, 10, 2], [2, 1]])]

    for got, gathered in zip(decode_steps(True), decode_steps(False)):
        torch.testing.assert_close(got, gathered, atol=1e-4, rtol=1e-4)
