"""Paged attention on the GPU, reading keys and values in place from the KV pool (a Triton kernel).

Without it, a CUDA step gathers each sequence's blocks into a padded [seqs, context] copy and runs SDPA over
the copy: the cache is read twice and written once per layer, and inside a captured CUDA graph the copy is
sized for the bucket's longest context. Here one program per (sequence, tile of its queries, KV head) walks
that sequence's block table, scores every query row of the tile against a tile of keys at once, and keeps a
running softmax (the flash-attention recurrence), so the pool is read once per tile and nothing is written but
the output. A tile's rows are its queries times the query heads that share the KV head (grouped-query
attention: one read of a key row for all of them), so one kernel serves a decode group (one query a sequence)
and a prefill chunk (many queries of one sequence, each seeing the keys up to its own position). CUDA sends it
decode groups; prefill chunks wait on its measurement on a GPU (models/attention.py).

It covers what the models need of attention: causal masking within a chunk over the cached prefix, grouped-query
heads, a sliding window (only positions some row of the tile sees are read, so a freed block outside every
window is never touched), learned sinks (the running softmax starts from the sink logit with weight one, so the
sink joins the normalisation and adds no value), and pools narrower than the model (bf16 rows widened as they
are read). Everything is widened to float32 as it is read. Float32 queries are then multiplied in IEEE float32;
16-bit ones on TF32 tensor cores, which hold bf16 and fp16 values exactly, so their products are exact and summed
in float32, as a bf16 flash attention's are (Triton's interpreter multiplies bf16 tiles as raw integers, so the
widening also keeps the CPU check honest).

The kernel is also run on CPU by Triton's interpreter (``TRITON_INTERPRET=1``), which is how the test suite checks
it on machines without a GPU (tests/test_triton_paged_attention.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

KEYS_PER_TILE = 32  # keys scored per loop step: two 16-key blocks, or several smaller ones
DECODE_ROWS = 16  # query rows a program holds with one query a sequence: tl.dot's smallest tile side
PREFILL_ROWS = 64  # and with many: each key tile read serves more rows
NO_SCORE_YET = -1e30  # a row's running maximum before it has seen a key: finite, so exp(max - new max) is 0


@triton.jit
def _paged_attention_kernel(
    q_ptr, keys_ptr, values_ptr, blocks_ptr, context_lens_ptr, query_positions_ptr, sinks_ptr, out_ptr,
    q_seq_stride, q_query_stride, q_head_stride, k_slot_stride, k_head_stride, v_slot_stride, v_head_stride,
    blocks_seq_stride, positions_seq_stride, out_seq_stride, out_query_stride, out_head_stride,
    scale, window, block_size,
    GROUP: tl.constexpr, GROUP_SPAN: tl.constexpr, QUERIES: tl.constexpr, HEAD_DIM: tl.constexpr,
    DIM_TILE: tl.constexpr, KEY_TILE: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SINKS: tl.constexpr,
    PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    first_query = tl.program_id(1) * QUERIES
    kv_head = tl.program_id(2)
    row = tl.arange(0, QUERIES * GROUP_SPAN)  # row r: query first_query + r // GROUP_SPAN, head r % GROUP_SPAN
    query = first_query + row // GROUP_SPAN
    member = row % GROUP_SPAN
    dim = tl.arange(0, DIM_TILE)
    key = tl.arange(0, KEY_TILE)
    heads = kv_head * GROUP + member
    real_dim = dim < HEAD_DIM

    context = tl.load(context_lens_ptr + seq)
    start = tl.load(query_positions_ptr + seq * positions_seq_stride)  # the sequence's queries fill [start, context)
    real_row = (member < GROUP) & (start + query < context)
    position = tl.minimum(start + query, context - 1)  # padding rows stand on the last query: never keyless
    q = tl.load(q_ptr + seq * q_seq_stride + query[:, None] * q_query_stride + heads[:, None] * q_head_stride
                + dim[None, :], mask=real_row[:, None] & real_dim[None, :], other=0.0).to(tl.float32)
    if HAS_SINKS:  # the sink is a key scoring its logit with a zero value: the softmax starts from it
        running_max = tl.load(sinks_ptr + heads, mask=member < GROUP, other=0.0).to(tl.float32)
        running_sum = tl.full([QUERIES * GROUP_SPAN], 1.0, tl.float32)
    else:
        running_max = tl.full([QUERIES * GROUP_SPAN], NO_SCORE_YET, tl.float32)
        running_sum = tl.zeros([QUERIES * GROUP_SPAN], tl.float32)
    acc = tl.zeros([QUERIES * GROUP_SPAN, DIM_TILE], tl.float32)

    # keys from the lowest row's window start to the highest row's position (none if the tile is all padding)
    lowest = start + first_query
    end = tl.minimum(lowest + QUERIES, context)
    first = tl.maximum(lowest - window + 1, 0) if HAS_WINDOW else 0
    for tile in range(first // KEY_TILE * KEY_TILE, end, KEY_TILE):
        key_position = tile + key
        readable = (key_position >= first) & (key_position < end)
        block = tl.load(blocks_ptr + seq * blocks_seq_stride + key_position // block_size, mask=readable, other=0)
        slot = block.to(tl.int64) * block_size + key_position % block_size
        row_mask = readable[:, None] & real_dim[None, :]
        k = tl.load(keys_ptr + slot[:, None] * k_slot_stride + kv_head * k_head_stride + dim[None, :],
                    mask=row_mask, other=0.0)
        v = tl.load(values_ptr + slot[:, None] * v_slot_stride + kv_head * v_head_stride + dim[None, :],
                    mask=row_mask, other=0.0)
        visible = readable[None, :] & (key_position[None, :] <= position[:, None])
        if HAS_WINDOW:
            visible = visible & (key_position[None, :] > position[:, None] - window)
        scores = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision=PRECISION)
        scores = tl.where(visible, scores * scale, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, axis=1))
        rescale = tl.exp(running_max - new_max)
        probs = tl.exp(scores - new_max[:, None])
        running_sum = running_sum * rescale + tl.sum(probs, axis=1)
        acc = acc * rescale[:, None] + tl.dot(probs, v.to(tl.float32), input_precision=PRECISION)
        running_max = new_max

    out = acc / tl.where(running_sum > 0, running_sum, 1.0)[:, None]  # zero only on all-padding tiles
    tl.store(out_ptr + seq * out_seq_stride + query[:, None] * out_query_stride + heads[:, None] * out_head_stride
             + dim[None, :], out.to(out_ptr.dtype.element_ty), mask=real_row[:, None] & real_dim[None, :])


def _tile(n: int) -> int:
    """The power of two at or above n, at least 16 (tl.dot's smallest tile side)."""
    return max(16, triton.next_power_of_2(n))


def paged_attention(
    q: Tensor,
    keys: Tensor,
    values: Tensor,
    key_blocks: Tensor,
    context_lens: Tensor,
    query_positions: Tensor,
    block_size: int,
    window: int,
    scale: float,
    sinks: Tensor | None,
) -> Tensor:
    """q [S, Q, H, D], up to Q queries per sequence -> [S, Q, H, D] in q's dtype, over the pool's keys and values
    [slots, KVH, D]. Sequence s's queries stand at positions [query_positions[s, 0], context_lens[s]), one a row
    from q[s, 0] on (rows past them are padding: left unwritten); the query at position p sees positions
    (p - window, p] (all up to p where ``window`` is 0), position t in slot
    key_blocks[s, t // block_size] * block_size + t % block_size. Asks nothing of the host: its grid depends only
    on shapes, so a CUDA graph can hold it."""
    num_seqs, max_query, num_heads, head_dim = q.shape
    kv_heads = keys.shape[1]
    if num_heads % kv_heads or keys.shape[2] != head_dim or values.shape != keys.shape:
        raise ValueError(f"q {tuple(q.shape)} does not fit a pool of keys {tuple(keys.shape)} and values "
                         f"{tuple(values.shape)}")
    q = q.contiguous() if q.stride(3) != 1 else q
    if keys.stride(2) != 1 or values.stride(2) != 1 or key_blocks.stride(1) != 1:
        raise ValueError("keys, values and key_blocks need contiguous last dimensions")
    out = torch.empty_like(q)
    group = num_heads // kv_heads
    group_span = triton.next_power_of_2(group)
    rows = max(group_span, DECODE_ROWS if max_query == 1 else PREFILL_ROWS)
    queries = rows // group_span
    grid = (num_seqs, triton.cdiv(max_query, queries), kv_heads)
    _paged_attention_kernel[grid](
        q, keys, values, key_blocks, context_lens, query_positions, sinks if sinks is not None else q, out,
        q.stride(0), q.stride(1), q.stride(2), keys.stride(0), keys.stride(1), values.stride(0), values.stride(1),
        key_blocks.stride(0), query_positions.stride(0), out.stride(0), out.stride(1), out.stride(2),
        scale, window, block_size,
        GROUP=group, GROUP_SPAN=group_span, QUERIES=queries, HEAD_DIM=head_dim, DIM_TILE=_tile(head_dim),
        KEY_TILE=KEYS_PER_TILE, HAS_WINDOW=window > 0, HAS_SINKS=sinks is not None,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )
    return out
