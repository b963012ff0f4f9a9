"""The fused GPT-2 decode block (models/gpt2_decode_block.py) against the torch modules it stands in for, and a
decode run through it against transformers on the same bf16-rounded weights."""

from __future__ import annotations

import random

import pytest
import torch

import models.gpt2 as gpt2_module
from models.bf16_weight_linear import KERNEL_MAX_ROWS
from models.cpu_kernels import cpu_kernels_loaded
from models.forward_batch import ForwardBatch
from models.kv_cache import PagedKVCache
from models.loader import load_model
from tests.fused_decode import assert_only_small_decode_steps_fuse, record_calls
from tests.test_bf16_weights import gpt2_oracle, rounded  # noqa: F401

BLOCK = 16
ATOL = 1e-4


@pytest.fixture(scope="module")
def gpt2(tiny_gpt2_dir):
    if not cpu_kernels_loaded():
        pytest.fail("the C++ CPU kernels did not build (g++ and ninja are test requirements)")
    return load_model(tiny_gpt2_dir, dtype="float32", device="cpu", cpu_weight_dtype="bfloat16").model


def decode_step(model, context_lens: list[int], cache_dtype: torch.dtype, fused: bool, monkeypatch):
    """One decode token for each sequence over a pool of random keys and values: (block 0's output, pool)."""
    torch.manual_seed(len(context_lens))
    spec = model.kv_cache_spec()
    blocks = [-(-n // BLOCK) for n in context_lens]
    cache = PagedKVCache(spec, sum(blocks) + 3, BLOCK, dtype=cache_dtype)
    for layer in range(spec.num_layers):
        for pool in cache.layer(layer):
            pool.copy_(torch.randn(pool.shape))
    order = torch.randperm(sum(blocks) + 3).tolist()
    tables = [[order.pop() for _ in range(n)] for n in blocks]
    tokens = [[random.Random(n).randrange(50257)] for n in context_lens]
    batch = ForwardBatch.build(tokens, [n - 1 for n in context_lens], tables, BLOCK)
    h = torch.randn(len(context_lens), model.config.n_embd)
    monkeypatch.setattr(gpt2_module, "fused_decode_applies", lambda h, kv: fused)
    with torch.inference_mode():
        out = model.h[0](h, batch, cache.layer(0))
    return out, cache.layer(0)


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("context_lens", [[1], [5, 16, 17, 40], [1 + i for i in range(KERNEL_MAX_ROWS)]])
def test_fused_block_computes_what_the_modules_compute(gpt2, monkeypatch, cache_dtype, context_lens):
    assert gpt2.h[0].fused_weights() is not None
    expected, expected_pool = decode_step(gpt2, context_lens, cache_dtype, False, monkeypatch)
    got, got_pool = decode_step(gpt2, context_lens, cache_dtype, True, monkeypatch)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    ulp = 2.0**-7 if cache_dtype == torch.bfloat16 else 1e-5  # a sum's last bit may round a bf16 key the other way
    for ours, theirs in zip(got_pool, expected_pool):  # the same keys and values, in the same slots
        torch.testing.assert_close(ours.float(), theirs.float(), rtol=ulp, atol=1e-5)


def test_only_small_decode_steps_take_the_fused_block(gpt2, monkeypatch):
    calls = record_calls(monkeypatch, gpt2_module, "fused_decode_block", rows_arg=0)
    assert_only_small_decode_steps_fuse(gpt2, calls, KERNEL_MAX_ROWS, gpt2.config.n_layer)


def test_decode_logits_through_the_fused_block_match_the_rounded_oracle(gpt2, gpt2_oracle):  # noqa: F811
    """Step by step, each decode token's logits against transformers' over the whole sequence so far."""
    rng = random.Random(1)
    prompts = [[rng.randrange(50257) for _ in range(n)] for n in (7, 30)]
    steps = 12
    tables = [[0, 1, 2], [3, 4, 5]]
    cache = PagedKVCache(gpt2.kv_cache_spec(), 6, BLOCK)
    sequences = [list(p) for p in prompts]
    with torch.inference_mode():
        hidden = gpt2(ForwardBatch.build(prompts, [0, 0], tables, BLOCK), cache)
        logits = gpt2.compute_logits(hidden[torch.tensor([6, 36])])
        for _ in range(steps):
            for seq, row in zip(sequences, logits):
                seq.append(int(row.argmax()))
            batch = ForwardBatch.build([[s[-1]] for s in sequences], [len(s) - 1 for s in sequences], tables, BLOCK)
            logits = gpt2.compute_logits(gpt2(batch, cache))
            for seq, row in zip(sequences, logits):
                expected = gpt2_oracle(torch.tensor([seq])).logits[0, -1]
                assert (row - expected).abs().max().item() <= ATOL
