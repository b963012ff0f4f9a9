"""The fused GPT-OSS decode layer (models/gpt_oss_decode_layer.py) against the torch modules it stands in for, on
the tiny checkpoint with packed MXFP4 experts in both of its modes, and decode runs through it against
transformers."""

from __future__ import annotations

import copy

import pytest
import torch

import models.gpt_oss as gpt_oss_module
from models.cpu_isa import cpu_isa
from models.forward_batch import ForwardBatch
from models.generation import greedy_generate
from models.kv_cache import PagedKVCache
from models.loader import load_model
from models.mxfp4 import BF16_KERNEL_MAX_ROWS
from tests.fused_decode import assert_only_small_decode_steps_fuse, record_calls
from tests.test_bf16_weights import rounded
from tests.test_cpu_bf16_compute import assert_as_close_as_transformers_bf16, teacher_forced_logits
from tests.test_gpt_oss import checkpoint_dir, oracle, oracle_logits, random_tokens  # noqa: F401

BLOCK = 4
SLIDING, FULL = 0, 1  # the tiny checkpoint's first layer slides (window 8), its second attends to everything
# bf16 activations (vdpbf16ps kernels), and float32 activations on bf16 weights (the checkpoint's weights are
# bf16 values already, so that mode computes transformers' fp32 model)
MODES = {"bf16": {"dtype": "bfloat16"}, "fp32-bf16-weights": {"dtype": "float32", "cpu_weight_dtype": "bfloat16"}}


def load(checkpoint_dir, mode: str):  # noqa: F811
    if mode == "bf16" and not cpu_isa().avx512_bf16:
        pytest.skip(f"the bf16 layer's kernels need AVX512-BF16; this CPU has {cpu_isa()}")
    return load_model(checkpoint_dir, device="cpu", keep_experts_packed=True, **MODES[mode]).model


@pytest.fixture(scope="module", params=MODES)
def model(request, checkpoint_dir):  # noqa: F811
    return load(checkpoint_dir, request.param)


def decode_step(model, layer: int, context_lens: list[int], cache_dtype: torch.dtype, fused: bool, monkeypatch):
    """One decode token for each sequence over a pool of random keys and values: (the layer's output, its pool)."""
    torch.manual_seed(len(context_lens))
    blocks = [-(-n // BLOCK) for n in context_lens]
    cache = PagedKVCache(model.kv_cache_spec(), sum(blocks) + 3, BLOCK, dtype=cache_dtype)
    for index in range(model.config.num_layers):
        for pool in cache.layer(index):
            pool.copy_(torch.randn(pool.shape))
    order = torch.randperm(sum(blocks) + 3).tolist()
    tables = [[order.pop() for _ in range(n)] for n in blocks]
    batch = ForwardBatch.build([[7]] * len(context_lens), [n - 1 for n in context_lens], tables, BLOCK)
    dtype = model.norm.weight.dtype if model.embedding(torch.tensor([0])).dtype == torch.float32 else torch.bfloat16
    x = torch.randn(len(context_lens), model.config.hidden_size).to(dtype)
    cos, sin = model.rotary.cos_sin(batch.positions, x.dtype)
    monkeypatch.setattr(gpt_oss_module, "fused_decode_applies", lambda x, kv: fused)
    with torch.inference_mode():
        out = model.layers[layer](x, cos, sin, batch.view(cache.group_of(layer)), cache.layer(layer))
    return out, cache.layer(layer)


def assert_same_layer_output(got: torch.Tensor, expected: torch.Tensor) -> None:
    """bf16: bit for bit (every rounding at the modules' points). float32: to the last bits, since a norm's sum
    and an exp may round differently from torch's vectorised ones."""
    assert got.dtype == expected.dtype
    if got.dtype == torch.bfloat16:
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    else:
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layer", [SLIDING, FULL])
@pytest.mark.parametrize("context_lens", [[1], [5, 16, 17, 40], [3 + 5 * i for i in range(BF16_KERNEL_MAX_ROWS)]])
def test_fused_layer_computes_what_the_modules_compute(model, monkeypatch, cache_dtype, layer, context_lens):
    assert model.layers[layer].fused_weights() is not None
    expected, expected_pool = decode_step(model, layer, context_lens, cache_dtype, False, monkeypatch)
    got, got_pool = decode_step(model, layer, context_lens, cache_dtype, True, monkeypatch)
    assert_same_layer_output(got, expected)
    for ours, theirs in zip(got_pool, expected_pool):  # the same keys and values, in the same slots
        assert_same_layer_output(ours, theirs)


@pytest.mark.parametrize("mode", MODES)
def test_tied_router_logits_pick_the_experts_the_modules_pick(checkpoint_dir, monkeypatch, mode):  # noqa: F811
    """Every router logit equal (zero weights, equal biases): both paths must take experts 0-3 for every token."""
    tied = load(checkpoint_dir, mode)
    for layer in tied.layers:
        layer.moe.router.packed.zero_()
        layer.moe.router.bias.fill_(0.5)
    expected, _ = decode_step(tied, FULL, [5, 16, 17, 40], torch.bfloat16, False, monkeypatch)
    got, _ = decode_step(tied, FULL, [5, 16, 17, 40], torch.bfloat16, True, monkeypatch)
    assert_same_layer_output(got, expected)


def test_only_small_decode_steps_take_the_fused_layer(model, checkpoint_dir, monkeypatch):  # noqa: F811
    calls = record_calls(monkeypatch, gpt_oss_module, "fused_decode_layer", rows_arg=0)
    assert_only_small_decode_steps_fuse(model, calls, BF16_KERNEL_MAX_ROWS, model.config.num_layers)
    fp32_weights = load_model(checkpoint_dir, dtype="float32", device="cpu", keep_experts_packed=True).model
    assert fp32_weights.layers[0].fused_weights() is None  # oneDNN's fp32 linears
    float_experts = load_model(checkpoint_dir, dtype="float32", device="cpu", cpu_weight_dtype="bfloat16").model
    assert float_experts.layers[0].fused_weights() is None
    greedy_generate(fp32_weights, [[1, 2, 3]], max_new_tokens=3)
    assert calls == []


def test_decode_through_the_fused_layer_matches_transformers(model, oracle, monkeypatch):  # noqa: F811
    """Teacher-forced decode steps of three sequences (one past the sliding window) against transformers on the
    same weights: fp32 activations to 1e-4 (the oracle's weights rounded to bf16 as the mode rounds them, norm
    scales and sinks included); bf16 ones no further from transformers' fp32 model than its own bf16 model
    strays (tests/test_cpu_bf16_compute.py)."""
    calls = record_calls(monkeypatch, gpt_oss_module, "fused_decode_layer", rows_arg=0)
    bf16 = type(oracle)(oracle.config)
    bf16.load_state_dict(oracle.state_dict())
    bf16 = bf16.to(torch.bfloat16).eval()
    bf16_weights = rounded(copy.deepcopy(oracle))
    sequences = [random_tokens(n, seed=n) for n in (9, 20, 40)]
    decoded = 6
    fp32 = model.embedding(torch.tensor([0])).dtype == torch.float32
    logits = teacher_forced_logits(model, sequences, decoded, torch.float32 if fp32 else torch.bfloat16)
    for seq, ours in zip(sequences, logits):
        if fp32:
            torch.testing.assert_close(ours[-decoded:], oracle_logits(bf16_weights, seq)[-decoded:], rtol=0, atol=1e-4)
        else:
            theirs_fp32 = oracle_logits(oracle, seq)[-decoded:]
            assert_as_close_as_transformers_bf16(ours[-decoded:], theirs_fp32, oracle_logits(bf16, seq)[-decoded:])
    assert len(calls) == decoded * model.config.num_layers
