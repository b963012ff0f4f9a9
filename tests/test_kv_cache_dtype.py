"""A bfloat16 KV cache under a float32 model (--kv-cache-dtype bfloat16): exactly the float32 model whose keys
and values are rounded to bf16 when stored.

The oracles are transformers' models with that rounding applied where their attention takes keys and values,
so the comparisons keep a tolerance near fp32's: what differs is only where our fp32 projections and theirs
round a value to different sides of a bf16 boundary (a few elements in ten thousand, each one bf16 step).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from torch import Tensor, nn

from models.cpu_kernels import cpu_kernels_loaded
from models.forward_batch import ForwardBatch
from models.gpt2 import load_gpt2
from models.kv_cache import KVCacheSpec, PagedKVCache, kv_cache_dtype
from models.loader import load_model
from server.engine import engine as engine_module
from server.engine.engine import EngineConfig, LLMEngine
from server.engine.sampling_params import SamplingParams
from tests.test_gpt_oss import BLOCK_SIZE as OSS_BLOCK, checkpoint_dir, oracle as oss_oracle, random_tokens  # noqa: F401

ATOL = 1e-3  # against the rounded oracle; the rounding itself moves logits by 0.04 (GPT-2) to 1.4 (GPT-OSS) here


def bf16(x: Tensor) -> Tensor:
    return x.to(torch.bfloat16).float()


def paged_run(model: nn.Module, ids: list[int], prefill: int, block_size: int) -> Tensor:
    """Logits at every position of ``ids``: one prefill step of ``prefill`` tokens, then one decode step a
    token, all through a bfloat16 pool whose blocks are handed out in shuffled order."""
    blocks = list(range(-(-len(ids) // block_size) + 3))
    random.Random(0).shuffle(blocks)
    cache = PagedKVCache(model.kv_cache_spec(), len(blocks), block_size, dtype=torch.bfloat16)
    out = []
    with torch.inference_mode():
        for start, end in [(0, prefill)] + [(p, p + 1) for p in range(prefill, len(ids))]:
            batch = ForwardBatch.build([ids[start:end]], [start], [blocks], block_size)
            out.append(model.compute_logits(model(batch, cache)))
    return torch.cat(out)


@pytest.fixture(scope="module", autouse=True)
def kernels():
    if not cpu_kernels_loaded():
        pytest.fail("the C++ CPU kernels did not build (g++ and ninja are test requirements)")


@contextmanager
def gpt2_oracle_with_rounded_kv(oracle: nn.Module) -> Iterator[nn.Module]:
    """GPT2LMHeadModel whose attention sees bf16-rounded keys and values (the last two thirds of c_attn)."""
    hidden = oracle.config.n_embd

    def round_kv(_module, _inputs, qkv: Tensor) -> Tensor:
        return torch.cat([qkv[..., :hidden], bf16(qkv[..., hidden:])], dim=-1)

    hooks = [block.attn.c_attn.register_forward_hook(round_kv) for block in oracle.transformer.h]
    try:
        yield oracle
    finally:
        for hook in hooks:
            hook.remove()


@pytest.fixture(scope="module")
def gpt2_oracle(tiny_gpt2_dir):
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir, attn_implementation="eager", dtype=torch.float32).eval()


def test_gpt2_with_a_bf16_cache_is_the_model_with_rounded_keys_and_values(tiny_gpt2_dir, gpt2_oracle):
    model = load_gpt2(tiny_gpt2_dir, torch.float32, torch.device("cpu"))
    ids = [random.Random(7).randrange(50257) for _ in range(60)]
    ours = paged_run(model, ids, prefill=23, block_size=8)
    with torch.no_grad():
        plain = gpt2_oracle(torch.tensor([ids])).logits[0]
        with gpt2_oracle_with_rounded_kv(gpt2_oracle):
            rounded = gpt2_oracle(torch.tensor([ids])).logits[0]
    assert (ours - rounded).abs().max() <= ATOL
    assert (ours - plain).abs().max() > 10 * (ours - rounded).abs().max(), "the cache must round what it stores"


def test_gpt_oss_with_a_bf16_cache_is_the_model_with_rounded_keys_and_values(checkpoint_dir, oss_oracle, monkeypatch):
    """Keys are rounded after their rotary embedding, as the cache stores them; sinks and the sliding window
    take part in both the prefill path and the decode kernels."""
    from transformers.models.gpt_oss import modeling_gpt_oss

    model = load_model(checkpoint_dir, dtype="float32", device="cpu").model
    ids = random_tokens(30, seed=3)
    ours = paged_run(model, ids, prefill=11, block_size=OSS_BLOCK)
    with torch.no_grad():
        plain = oss_oracle(torch.tensor([ids])).logits[0]
        rotary = modeling_gpt_oss.apply_rotary_pos_emb

        def rotary_then_round(q, k, cos, sin, *args, **kwargs):
            q, k = rotary(q, k, cos, sin, *args, **kwargs)
            return q, bf16(k)

        monkeypatch.setattr(modeling_gpt_oss, "apply_rotary_pos_emb", rotary_then_round)
        layers = oss_oracle.model.layers
        hooks = [layer.self_attn.v_proj.register_forward_hook(lambda _m, _i, v: bf16(v)) for layer in layers]
        try:
            rounded = oss_oracle(torch.tensor([ids])).logits[0]
        finally:
            for hook in hooks:
                hook.remove()
    assert (ours - rounded).abs().max() <= ATOL
    assert (ours - plain).abs().max() > 10 * (ours - rounded).abs().max(), "the cache must round what it stores"


@pytest.mark.parametrize("heads,kv_heads,window", [(12, 12, 0), (8, 2, 5)])
def test_decode_kernels_read_a_bf16_pool_as_its_float32_values(heads, kv_heads, window):
    """Widening bf16 to fp32 is exact, so the kernels must give what they give on the widened pool."""
    gen = torch.Generator().manual_seed(heads)
    block, head_dim, lens = 16, 64, [1, 16, 17, 40]
    keys = torch.randn(20 * block, kv_heads, head_dim, generator=gen).to(torch.bfloat16)
    values = torch.randn(20 * block, kv_heads, head_dim, generator=gen).to(torch.bfloat16)
    tables = torch.randperm(20, generator=gen)[:12].view(4, 3).contiguous()
    context_lens = torch.tensor(lens)
    q = torch.randn(4, heads, head_dim, generator=gen)
    attend = torch.ops.gptserve.paged_decode_attention
    for sinks in (None, torch.randn(heads, generator=gen)):
        args = (tables, context_lens, block, window, 0.125, sinks)
        out = attend(q, keys, values, *args)
        torch.testing.assert_close(out, attend(q, keys.float(), values.float(), *args), rtol=1e-6, atol=1e-6)


def test_the_engine_sizes_and_allocates_the_pool_in_the_cache_dtype(tiny_gpt2_dir, monkeypatch):
    """A fixed memory budget (not the host's free memory, which drifts) buys exactly twice the blocks in bf16."""
    loaded = load_model(tiny_gpt2_dir, dtype="float32", device="cpu")
    spec = loaded.model.kv_cache_spec()
    assert spec.bytes_per_token(torch.bfloat16) * 2 == spec.bytes_per_token(torch.float32)
    block_size, fp32_blocks = 16, 40
    budget = fp32_blocks * block_size * spec.bytes_per_token(torch.float32)
    monkeypatch.setattr(engine_module, "free_memory_bytes", lambda device: budget * 4)
    engines = {name: LLMEngine(loaded, EngineConfig(kv_cache_dtype=name, kv_memory_fraction=0.25, max_num_seqs=512,
                                                    block_size=block_size))
               for name in ("auto", "bfloat16")}
    assert engines["auto"].cache.keys[0].dtype == torch.float32
    assert engines["bfloat16"].cache.values[-1].dtype == torch.bfloat16
    assert engines["auto"].capacity_tokens == fp32_blocks * block_size
    assert engines["bfloat16"].capacity_tokens == 2 * fp32_blocks * block_size
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    for engine in engines.values():
        engine.add_request("r", list(range(100, 140)), params)
    outputs = {name: run_to_completion(engine) for name, engine in engines.items()}
    assert len(outputs["bfloat16"]) == 12
    assert sum(a == b for a, b in zip(outputs["auto"], outputs["bfloat16"])) >= 10  # rounding may flip a near tie


def run_to_completion(engine: LLMEngine) -> list[int]:
    tokens: list[int] = []
    while engine.has_work:
        for _, output in engine.step():
            tokens += output.new_token_ids
    return tokens


def test_kv_cache_dtype_names():
    assert kv_cache_dtype("auto", torch.bfloat16) is torch.bfloat16
    assert kv_cache_dtype("bfloat16", torch.float32) is torch.bfloat16
    with pytest.raises(ValueError, match="unknown KV cache dtype 'fp8'"):
        kv_cache_dtype("fp8", torch.float32)
    from server.cli import parse_config

    assert parse_config([]).engine.kv_cache_dtype == "auto"
    assert parse_config(["--kv-cache-dtype", "bfloat16"]).engine.kv_cache_dtype == "bfloat16"
    assert KVCacheSpec(2, 3, 4).bytes_per_token(torch.bfloat16) == 2 * 2 * 3 * 4 * 2
