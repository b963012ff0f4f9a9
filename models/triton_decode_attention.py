"""Paged decode attention on the GPU, reading keys and values in place from the KV pool (a Triton kernel).

Without it, a CUDA decode step gathers each sequence's blocks into a padded [seqs, context] copy and runs SDPA
over the copy: the cache is read twice and written once per layer, and inside a captured CUDA graph the copy is
sized for the bucket's longest context. Here one program per (sequence, KV head) walks that sequence's block
table, scores every query head that shares the KV head against a tile of keys at once (grouped-query
attention: one read of a key row for all its query heads), and keeps a running softmax (the flash-attention
recurrence), so the pool is read once and nothing is written but the output.

It covers what the models need of decode attention: grouped-query heads, a sliding window (only the window's
positions are read, so a freed block outside it is never touched), learned sinks (the running softmax starts
from the sink logit with weight one, so the sink joins the normalisation and adds no value), and pools
narrower than the model (bf16 rows widened as they are read). Everything is widened to float32 as it is read.
Float32 queries are then multiplied in IEEE float32; 16-bit ones on TF32 tensor cores, which hold bf16 and fp16
values exactly, so their products are exact and summed in float32, as a bf16 flash attention's are (Triton's
interpreter multiplies bf16 tiles as raw integers, so the widening also keeps the CPU check honest).

The kernel is also run on CPU by Triton's interpreter (``TRITON_INTERPRET=1``), which is how the test suite checks
it on machines without a GPU (tests/test_triton_decode_attention.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

KEYS_PER_TILE = 32  # keys scored per loop step: two 16-key blocks, or several smaller ones


@triton.jit
def _paged_decode_kernel(
    q_ptr, keys_ptr, values_ptr, blocks_ptr, context_lens_ptr, sinks_ptr, out_ptr,
    q_seq_stride, q_head_stride, k_slot_stride, k_head_stride, v_slot_stride, v_head_stride, blocks_seq_stride,
    out_seq_stride, out_head_stride,
    scale, window, block_size,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, GROUP_TILE: tl.constexpr, DIM_TILE: tl.constexpr,
    KEY_TILE: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SINKS: tl.constexpr, PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    member = tl.arange(0, GROUP_TILE)  # query heads of this KV head, padded to a tile tl.dot takes
    dim = tl.arange(0, DIM_TILE)
    key = tl.arange(0, KEY_TILE)
    heads = kv_head * GROUP + member
    real_head, real_dim = member < GROUP, dim < HEAD_DIM

    q = tl.load(q_ptr + seq * q_seq_stride + heads[:, None] * q_head_stride + dim[None, :],
                mask=real_head[:, None] & real_dim[None, :], other=0.0).to(tl.float32)
    context = tl.load(context_lens_ptr + seq)
    first = tl.maximum(context - window, 0) if HAS_WINDOW else 0
    if HAS_SINKS:  # the sink is a key scoring its logit with a zero value: the softmax starts from it
        running_max = tl.load(sinks_ptr + heads, mask=real_head, other=0.0).to(tl.float32)
        running_sum = tl.full([GROUP_TILE], 1.0, tl.float32)
    else:
        running_max = tl.full([GROUP_TILE], float("-inf"), tl.float32)
        running_sum = tl.zeros([GROUP_TILE], tl.float32)
    acc = tl.zeros([GROUP_TILE, DIM_TILE], tl.float32)

    # every tile holds at least one visible key (the first holds `first`), so no row's maximum stays -inf
    for tile in range(first // KEY_TILE * KEY_TILE, context, KEY_TILE):
        position = tile + key
        visible = (position >= first) & (position < context)
        block = tl.load(blocks_ptr + seq * blocks_seq_stride + position // block_size, mask=visible, other=0)
        slot = block.to(tl.int64) * block_size + position % block_size
        row_mask = visible[:, None] & real_dim[None, :]
        k = tl.load(keys_ptr + slot[:, None] * k_slot_stride + kv_head * k_head_stride + dim[None, :],
                    mask=row_mask, other=0.0)
        v = tl.load(values_ptr + slot[:, None] * v_slot_stride + kv_head * v_head_stride + dim[None, :],
                    mask=row_mask, other=0.0)
        scores = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision=PRECISION)
        scores = tl.where(visible[None, :], scores * scale, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, axis=1))
        rescale = tl.exp(running_max - new_max)
        probs = tl.exp(scores - new_max[:, None])
        running_sum = running_sum * rescale + tl.sum(probs, axis=1)
        acc = acc * rescale[:, None] + tl.dot(probs, v.to(tl.float32), input_precision=PRECISION)
        running_max = new_max

    out = acc / running_sum[:, None]
    tl.store(out_ptr + seq * out_seq_stride + heads[:, None] * out_head_stride + dim[None, :],
             out.to(out_ptr.dtype.element_ty), mask=real_head[:, None] & real_dim[None, :])


def _tile(n: int) -> int:
    """The power of two at or above n, at least 16 (tl.dot's smallest tile side)."""
    return max(16, triton.next_power_of_2(n))


def paged_decode_attention(
    q: Tensor,
    keys: Tensor,
    values: Tensor,
    key_blocks: Tensor,
    context_lens: Tensor,
    block_size: int,
    window: int,
    scale: float,
    sinks: Tensor | None,
) -> Tensor:
    """q [S, H, D], one query per sequence -> [S, H, D] in q's dtype, over the pool's keys and values
    [slots, KVH, D]: sequence s sees positions [max(0, context_lens[s] - window), context_lens[s]) (all of
    them where ``window`` is 0), position p in slot key_blocks[s, p // block_size] * block_size
    + p % block_size. Asks nothing of the host: its grid depends only on shapes, so a CUDA graph can hold it."""
    num_seqs, num_heads, head_dim = q.shape
    kv_heads = keys.shape[1]
    if num_heads % kv_heads or keys.shape[2] != head_dim or values.shape != keys.shape:
        raise ValueError(f"q {tuple(q.shape)} does not fit a pool of keys {tuple(keys.shape)} and values "
                         f"{tuple(values.shape)}")
    q = q.contiguous() if q.stride(2) != 1 else q
    if keys.stride(2) != 1 or values.stride(2) != 1 or key_blocks.stride(1) != 1:
        raise ValueError("keys, values and key_blocks need contiguous last dimensions")
    out = torch.empty_like(q)
    group = num_heads // kv_heads
    _paged_decode_kernel[(num_seqs, kv_heads)](
        q, keys, values, key_blocks, context_lens, sinks if sinks is not None else q, out,
        q.stride(0), q.stride(1), keys.stride(0), keys.stride(1), values.stride(0), values.stride(1),
        key_blocks.stride(0), out.stride(0), out.stride(1),
        scale, window, block_size,
        GROUP=group, HEAD_DIM=head_dim, GROUP_TILE=_tile(group), DIM_TILE=_tile(head_dim), KEY_TILE=KEYS_PER_TILE,
        HAS_WINDOW=window > 0, HAS_SINKS=sinks is not None,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )
    return out
