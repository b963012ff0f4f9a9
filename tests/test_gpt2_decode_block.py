"""The fused GPT-2 decode block (models/gpt2_decode_block.py) against the torch modules it stands in for, in both
of its modes, and decode runs through it against transformers."""

from __future__ import annotations

import random

import pytest
import torch

import models.gpt2 as gpt2_module
from models.bf16_weight_linear import KERNEL_MAX_ROWS
from models.cpu_isa import cpu_isa
from models.cpu_kernels import cpu_kernels_loaded
from models.forward_batch import ForwardBatch
from models.kv_cache import PagedKVCache
from models.loader import load_model
from tests.fused_decode import assert_only_small_decode_steps_fuse, record_calls
from tests.test_bf16_weights import gpt2_oracle, rounded  # noqa: F401
from tests.test_cpu_bf16_compute import ZEN4, assert_as_close_as_transformers_bf16, fake_isa, gpt2_oracles

BLOCK = 16
ATOL = 1e-4
# float32 activations on bf16 weights (bf16_linear), and bf16 activations (the vdpbf16ps linears a bf16 model
# takes on a CPU with AVX512-BF16 and no AMX; an AMX CPU is loaded as one without, to test the same path)
MODES = {"fp32-bf16-weights": {"dtype": "float32", "cpu_weight_dtype": "bfloat16"}, "bf16": {"dtype": "bfloat16"}}


@pytest.fixture(scope="module", params=MODES)
def gpt2(request, tiny_gpt2_dir):
    if not cpu_kernels_loaded():
        pytest.fail("the C++ CPU kernels did not build (g++ and ninja are test requirements)")
    if request.param == "bf16" and not cpu_isa().avx512_bf16:
        pytest.skip(f"the bf16 block's linears need AVX512-BF16; this CPU has {cpu_isa()}")
    with pytest.MonkeyPatch.context() as monkeypatch:
        fake_isa(monkeypatch, ZEN4)
        return load_model(tiny_gpt2_dir, device="cpu", **MODES[request.param]).model


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
    h = torch.randn(len(context_lens), model.config.n_embd).to(model.ln_f.weight.dtype)
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
    assert got.dtype == expected.dtype
    torch.testing.assert_close(got, expected, rtol=0, atol=0)  # the same ops and kernels: the same bits
    for ours, theirs in zip(got_pool, expected_pool):  # the same keys and values, in the same slots
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_only_small_decode_steps_take_the_fused_block(gpt2, monkeypatch):
    calls = record_calls(monkeypatch, gpt2_module, "fused_decode_block", rows_arg=0)
    assert_only_small_decode_steps_fuse(gpt2, calls, KERNEL_MAX_ROWS, gpt2.config.n_layer)


def test_decode_logits_through_the_fused_block_match_the_rounded_oracle(gpt2, gpt2_oracle, tiny_gpt2_dir,  # noqa: F811
                                                                       monkeypatch):
    """Step by step, each decode token's logits against transformers' over the whole sequence so far: to 1e-4
    on the same bf16-rounded weights with float32 activations; with bf16 ones, no further from transformers'
    fp32 model than its own bf16 model strays, on average over a sequence's steps (one row's ratio ranges
    0.7-1.7 on the modules and the fused block alike)."""
    calls = record_calls(monkeypatch, gpt2_module, "fused_decode_block", rows_arg=0)
    fp32 = gpt2.ln_f.weight.dtype == torch.float32
    if not fp32:
        theirs_fp32, theirs_bf16 = gpt2_oracles(tiny_gpt2_dir)
    rng = random.Random(1)
    prompts = [[rng.randrange(50257) for _ in range(n)] for n in (7, 30)]
    steps = 12
    tables = [[0, 1, 2], [3, 4, 5]]
    cache = PagedKVCache(gpt2.kv_cache_spec(), 6, BLOCK, dtype=gpt2.ln_f.weight.dtype)
    sequences = [list(p) for p in prompts]
    decoded: list[list[tuple]] = [[] for _ in prompts]  # bf16: each step's (ours, fp32's, bf16's) logits
    with torch.inference_mode():
        hidden = gpt2(ForwardBatch.build(prompts, [0, 0], tables, BLOCK), cache)
        logits = gpt2.compute_logits(hidden[torch.tensor([6, 36])])
        for _ in range(steps):
            for seq, row in zip(sequences, logits):
                seq.append(int(row.argmax()))
            batch = ForwardBatch.build([[s[-1]] for s in sequences], [len(s) - 1 for s in sequences], tables, BLOCK)
            logits = gpt2.compute_logits(gpt2(batch, cache))
            for seq, row, rows in zip(sequences, logits, decoded):
                ids = torch.tensor([seq])
                if fp32:
                    assert (row - gpt2_oracle(ids).logits[0, -1]).abs().max().item() <= ATOL
                else:
                    rows.append((row, theirs_fp32(ids).logits[0, -1], theirs_bf16(ids).logits[0, -1]))
    for rows in decoded:
        if rows:
            assert_as_close_as_transformers_bf16(*(torch.stack(column) for column in zip(*rows)))
    assert calls == [2] * steps * gpt2.config.n_layer
