"""The C++ paged decode attention against the gather + SDPA path it replaces on CPU."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import models.attention as attention
from models.cpu_kernels import cpu_kernels_loaded
from models.forward_batch import ForwardBatch

BLOCK = 16
PROJECT_ROOT = Path(__file__).resolve().parent.parent


def test_kernels_build_here():
    """CI has g++ and ninja: the kernel path, not the fallback, is what the model tests exercise on CPU."""
    assert cpu_kernels_loaded()


def decode_batch(context_lens: list[int], num_blocks: int, seed: int) -> ForwardBatch:
    """One decode token per sequence, each sequence's blocks drawn at random from the pool."""
    rng = random.Random(seed)
    free = list(range(num_blocks))
    rng.shuffle(free)
    tables = [[free.pop() for _ in range(-(-n // BLOCK))] for n in context_lens]
    return ForwardBatch.build([[1] for _ in context_lens], [n - 1 for n in context_lens], tables, BLOCK)


def attend(
    batch: ForwardBatch, heads: int, kv_heads: int, head_dim: int, window, sinks, use_kernels: bool, monkeypatch
):
    torch.manual_seed(0)
    slots = 64 * BLOCK
    cache = (torch.randn(slots, kv_heads, head_dim), torch.randn(slots, kv_heads, head_dim))
    q = torch.randn(batch.num_tokens, heads, head_dim)
    k, v = torch.randn(batch.num_tokens, kv_heads, head_dim), torch.randn(batch.num_tokens, kv_heads, head_dim)
    monkeypatch.setattr(attention, "decode_kernels_apply", lambda _q: use_kernels)
    return attention.paged_attention(q, k, v, cache, batch.view(0), window=window, sinks=sinks)


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(12, 12, 64), (8, 2, 64), (4, 1, 12)])
@pytest.mark.parametrize("window", [None, 5, 40])
@pytest.mark.parametrize("with_sinks", [False, True])
def test_kernels_match_gather_and_sdpa(monkeypatch, heads, kv_heads, head_dim, window, with_sinks):
    batch = decode_batch([1, 15, 16, 17, 33, 200], num_blocks=64, seed=heads + head_dim)
    sinks = torch.randn(heads) if with_sinks else None
    args = (batch, heads, kv_heads, head_dim, window, sinks)
    expected = attend(*args, use_kernels=False, monkeypatch=monkeypatch)
    got = attend(*args, use_kernels=True, monkeypatch=monkeypatch)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("isa", ["avx512", "avx2", "portable"])
@pytest.mark.parametrize("pool_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(12, 12, 64), (8, 2, 64), (16, 2, 64), (6, 3, 32)])
def test_every_isa_path_this_cpu_runs_matches_gather_and_sdpa(isa, pool_dtype, heads, kv_heads, head_dim):
    """The op called with each path by name (AVX-512 takes head dims that are multiples of 16, up to 64), windowed
    and with sinks, from float32 and bfloat16 pools; a path this CPU lacks is refused by the op, and skipped."""
    assert cpu_kernels_loaded()
    batch = decode_batch([1, 15, 16, 17, 33, 200, 311], num_blocks=64, seed=7)
    group = batch.view(0).groups[0]
    torch.manual_seed(1)
    keys, values = (torch.randn(64 * BLOCK, kv_heads, head_dim).to(pool_dtype) for _ in range(2))
    q, sinks = torch.randn(group.num_seqs, heads, head_dim), torch.randn(heads)
    for window in (0, 40):
        args = (q, keys, values, group.key_blocks, group.context_lens, BLOCK, window, head_dim**-0.5, sinks)
        try:
            got = torch.ops.gptserve.paged_decode_attention(*args, isa)
        except RuntimeError as error:
            pytest.skip(str(error))
        expected = reference_attention(q, keys.float(), values.float(), group, window or None, sinks)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def reference_attention(q, keys, values, group, window, sinks, block_size=BLOCK):
    """Each sequence's visible keys gathered by hand, softmax with the sink logit in float64."""
    out = torch.empty_like(q)
    group_size = q.shape[1] // keys.shape[1]
    for s in range(q.shape[0]):
        ctx = int(group.context_lens[s])
        lo = max(0, ctx - window) if window else 0
        slots = [int(group.key_blocks[s, t // block_size]) * block_size + t % block_size for t in range(lo, ctx)]
        k = keys[slots].double().repeat_interleave(group_size, dim=1)  # [L, H, D]
        v = values[slots].double().repeat_interleave(group_size, dim=1)
        scores = torch.einsum("hd,lhd->hl", q[s].double(), k) * q.shape[-1] ** -0.5
        scores = torch.cat([scores, sinks.double()[:, None]], dim=1)
        probs = torch.softmax(scores, dim=1)[:, :-1]
        out[s] = torch.einsum("hl,lhd->hd", probs, v).float()
    return out


def test_mixed_batch_uses_kernels_for_decode_rows_only(monkeypatch):
    """A prefill chunk beside decode tokens: the chunk keeps SDPA, the decode group uses the kernels."""
    tables = [[5, 9], [3], [7, 1, 2]]
    batch = ForwardBatch.build([[1], [4, 5, 6], [2]], [20, 0, 40], tables, BLOCK)
    expected = attend(batch, 4, 2, 16, None, None, use_kernels=False, monkeypatch=monkeypatch)
    got = attend(batch, 4, 2, 16, None, None, use_kernels=True, monkeypatch=monkeypatch)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "block,context_len,message",
    [(0, BLOCK + 1, "longer than its blocks"), (4, 1, "outside the pool"), (-1, 1, "outside the pool"),
     (0, 0, "no key")],
)
def test_out_of_range_geometry_is_refused_not_read(block, context_len, message):
    assert cpu_kernels_loaded()
    q, keys = torch.randn(1, 2, 8), torch.randn(4 * BLOCK, 2, 8)
    args = (torch.tensor([[block]]), torch.tensor([context_len]), BLOCK, 0, 1.0, None)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.gptserve.paged_decode_attention(q, keys, keys.clone(), *args)


def test_a_failed_build_falls_back_with_a_warning(monkeypatch, caplog):
    import torch.utils.cpp_extension

    def no_compiler(**_kwargs):
        raise RuntimeError("g++: command not found")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compiler)
    assert cpu_kernels_loaded.__wrapped__() is False
    assert "gathers the KV cache instead" in caplog.text and "g++: command not found" in caplog.text


def test_a_lock_left_by_a_killed_build_does_not_hang_the_next_start(tmp_path):
    """torch's builder waits forever on a lock file whose owner died; a killed first start must not brick later ones."""
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    load = "from models.cpu_kernels import cpu_kernels_loaded; print(cpu_kernels_loaded())"
    build_dir = tmp_path / "gptserve_cpu_kernels"  # torch's layout under TORCH_EXTENSIONS_DIR
    build_dir.mkdir()
    (build_dir / "lock").touch()  # what a build killed part-way leaves behind
    done = subprocess.run([sys.executable, "-c", load], env=env, capture_output=True, text=True, timeout=240,
                          cwd=PROJECT_ROOT)
    assert done.stdout.strip() == "True", done.stderr[-2000:]
