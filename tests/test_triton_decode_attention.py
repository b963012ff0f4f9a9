"""The Triton paged decode attention (the CUDA decode path) against attention computed by hand.

On a machine without a GPU the kernel runs under Triton's interpreter (``TRITON_INTERPRET=1``, which
tests/conftest.py sets for CPU runs); with ``--device cuda`` it is compiled and run on the GPU. Each case draws
a pool, block tables whose blocks are scattered through it, ragged contexts, and the head layouts the models
use (GPT-2's 12 heads of their own, GPT-OSS's 8 query heads to a KV head). Then both models' mixed prefill and
decode batches run with every decode row through the kernel, against transformers.
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
from models.testing.gpt_oss_checkpoint import write_tiny_gpt_oss
from tests.gpt_oss_oracle import transformers_gpt_oss
from tests.test_gpt2 import test_paged_decode_matches_full_forward_for_mixed_batch as gpt2_mixed_batches
from tests.test_gpt_oss import (
    SLIDING_WINDOW,
    test_paged_prefill_and_decode_in_mixed_batches_match_full_forward as gpt_oss_mixed_batches,
)
from tests.test_paged_decode_kernels import reference_attention


@pytest.fixture(scope="module")
def kernel(device: torch.device):
    """The kernel's module: compiled on CUDA, interpreted on CPU (tests/conftest.py sets TRITON_INTERPRET)."""
    pytest.importorskip("triton")
    if device.type == "cpu":
        assert os.environ.get("TRITON_INTERPRET") == "1", "Triton would compile for a GPU this machine lacks"
    return importlib.import_module("models.triton_decode_attention")


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

    def expected(self, q, window: int, sinks):
        """Attention by hand in float64 (tests/test_paged_decode_kernels.py), on the CPU."""
        group = SimpleNamespace(context_lens=self.context_lens.cpu(), key_blocks=self.key_blocks.cpu())
        sinks = sinks.cpu() if sinks is not None else torch.full((q.shape[1],), float("-inf"))
        return reference_attention(q.float().cpu(), self.keys.float().cpu(), self.values.float().cpu(), group,
                                   window or None, sinks, self.block_size)


CONTEXTS = [1, 15, 16, 17, 33, 100]


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(12, 12, 64), (16, 2, 64), (6, 3, 24)])
@pytest.mark.parametrize("window,with_sinks,block_size", [(0, False, 16), (40, True, 16), (5, True, 4), (0, True, 4)])
def test_float32_matches_attention_by_hand(kernel, device, heads, kv_heads, head_dim, window, with_sinks, block_size):
    """IEEE float32 throughout: within float32 rounding of the float64 answer, at any block size and head dim."""
    case = Case(CONTEXTS, block_size, kv_heads, head_dim, torch.float32, device, seed=heads + window + block_size)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(len(CONTEXTS), heads, head_dim, generator=g).to(device)
    sinks = torch.randn(heads, generator=g).to(device) if with_sinks else None
    got = kernel.paged_decode_attention(q, case.keys, case.values, case.key_blocks, case.context_lens,
                                        block_size, window, head_dim**-0.5, sinks)
    torch.testing.assert_close(got.cpu(), case.expected(q, window, sinks), atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("q_dtype,pool_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16),
                                                (torch.float16, torch.float16)])
def test_narrow_pools_and_queries_at_gpt_oss_heads(kernel, device, q_dtype, pool_dtype):
    """GPT-OSS's layout (64 query heads on 8 KV heads, sinks, a 128-token window beside a full layer): a float32
    query over a bf16 pool is exact to float32 after the widening; 16-bit queries to their own rounding."""
    case = Case([1, 77, 129, 300], 16, 8, 64, pool_dtype, device, seed=3)
    g = torch.Generator().manual_seed(2)
    q = torch.randn(4, 64, 64, generator=g).to(device=device, dtype=q_dtype)
    sinks = torch.randn(64, generator=g).to(device)
    tolerance = 2e-6 if q_dtype == torch.float32 else 2e-2
    for window in (0, 128):
        got = kernel.paged_decode_attention(q, case.keys, case.values, case.key_blocks, case.context_lens, 16,
                                            window, 0.125, sinks)
        assert got.dtype == q_dtype
        torch.testing.assert_close(got.float().cpu(), case.expected(q, window, sinks), atol=tolerance,
                                   rtol=tolerance)


def test_blocks_outside_the_window_are_never_read(kernel, device):
    """A sliding layer frees the blocks its window has passed; their table entries may point anywhere (here
    past the pool's end). Only the window's blocks are read, so the answer is as if they were valid."""
    case = Case([70], 16, 2, 32, torch.float32, device, seed=5)
    q = torch.randn(1, 4, 32).to(device)
    expected = case.expected(q, 20, None)
    case.key_blocks[0, :3] = 10**9  # positions 0-47: the window of 20 starts at 50
    got = kernel.paged_decode_attention(q, case.keys, case.values, case.key_blocks, case.context_lens, 16, 20,
                                        32**-0.5, None)
    torch.testing.assert_close(got.cpu(), expected, atol=2e-6, rtol=2e-6)


def test_a_pool_that_does_not_fit_the_queries_is_refused(kernel, device):
    keys, q = torch.randn(64, 3, 16, device=device), torch.randn(1, 4, 16, device=device)
    blocks, lens = torch.zeros(1, 4, dtype=torch.long, device=device), torch.ones(1, dtype=torch.long, device=device)
    with pytest.raises(ValueError, match="does not fit"):
        kernel.paged_decode_attention(q, keys, keys, blocks, lens, 16, 0, 1.0, None)


@pytest.fixture
def decode_through_triton(kernel, monkeypatch):
    """Decode groups take the Triton kernel whatever the device (on CPU, interpreted)."""
    monkeypatch.setattr(attention, "decode_kernels_apply", lambda _q: False)
    monkeypatch.setattr(attention, "triton_decode_applies", lambda _q: True)


def test_gpt2_decodes_through_the_kernel_as_transformers_does(decode_through_triton, tiny_gpt2_dir, device):
    """GPT-2's mixed prefill and decode batches (tests/test_gpt2.py), every decode row through the kernel."""
    from transformers import GPT2LMHeadModel

    oracle = GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir, attn_implementation="eager", dtype=torch.float32)
    gpt2_mixed_batches(load_gpt2(tiny_gpt2_dir, torch.float32, device), oracle.to(device).eval(), device)


def test_gpt_oss_decodes_through_the_kernel_as_transformers_does(decode_through_triton, device, tmp_path):
    """GPT-OSS's (tests/test_gpt_oss.py): sliding-window layers beside full ones, sinks, 8 query heads a KV head."""
    if device.type != "cpu":
        pytest.skip("the GPT-OSS oracle tests run on CPU")
    checkpoint = write_tiny_gpt_oss(tmp_path, layout="hf", sliding_window=SLIDING_WINDOW)
    gpt_oss_mixed_batches(load_gpt_oss(checkpoint, torch.float32, device), transformers_gpt_oss(checkpoint))
