"""Causal attention over the paged KV cache, shared by GPT-2 and GPT-OSS.

Each step writes the batch's new keys/values into their slots, then for every attention group gathers the
group's keys into a padded [seqs, context] tensor and runs one scaled-dot-product attention over it.
Learned attention sinks (GPT-OSS) join the softmax as one extra key with zero value whose score is the
sink logit, which keeps the whole computation inside SDPA with only its boolean [seqs, 1, queries, keys]
mask: no float bias per head (at one 1024-token prompt and 64 heads that bias was 269 MB; bench/NOTES.md).

On CPU in float32 (or bfloat16, the queries widened) the decode group skips the gather: one C++ op
(models/csrc/paged_decode_attention.cpp) reads each key and value row straight from the pool and takes the
softmax in between. At 64 sequences of ~200 tokens the gather + SDPA read the cache three times and took
~120 ms of a ~270 ms GPT-2-124M step (bench/NOTES.md). A sliding-window layer's prefill gathers only the
blocks its queries can see, and a long chunk attends a run of QUERY_TILE queries at a time over only the keys
that run may see: with one call over the whole chunk, SDPA under a mask computed every query against every
key, 16 times the work a 2048-token chunk's sliding layers need and twice the causal half of the full ones
(bench/NOTES.md, session 24).

The pool may be narrower than the model (models/kv_cache.py): keys and values are cast to its dtype when
written, and widened back when read (the kernels widen bfloat16 rows in registers).

On CUDA the decode group reads the pool in place too, through a Triton kernel (models/triton_paged_attention.py)
that a captured decode graph replays like any other kernel. The kernel takes prefill chunks as well (tested
against attention by hand), but they keep gather + SDPA until it is measured on a GPU (bench/NOTES.md,
session 17).
"""

from __future__ import annotations

import functools
import importlib.util
import logging

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from models.cpu_kernels import decode_kernels_apply
from models.forward_batch import AttentionGroup, KVView

log = logging.getLogger(__name__)

# Every backend but cuDNN's: it builds a plan for each new shape (median 66 ms, up to 1.1 s on an H100), and
# the groups here change shape almost every step, so those plans never pay off (bench/NOTES.md, CUDA).
SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
# Queries of a prefill chunk attended together (AttentionGroup.query_tiles).
QUERY_TILE = 256


def paged_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cache: tuple[Tensor, Tensor],
    kv: KVView,
    window: int | None = None,
    sinks: Tensor | None = None,
) -> Tensor:
    """q [T, H, D], k and v [T, KVH, D] for the batch's tokens -> attention output [T, H, D], over ``kv``, the
    batch's view of this layer's KV group.

    ``window`` limits each query to the last ``window`` positions (itself included).
    ``sinks`` [H] are per-head logits that take part in the softmax normalisation.
    """
    key_cache, value_cache = cache
    key_cache.index_copy_(0, kv.slot_mapping, k.to(key_cache.dtype))
    value_cache.index_copy_(0, kv.slot_mapping, v.to(value_cache.dtype))
    num_heads, head_dim = q.shape[1], q.shape[2]
    out = torch.empty_like(q)
    for group in kv.groups:
        if group.max_query == 1 and triton_attention_applies(q.device):
            out[group.token_index] = triton_attention(q, key_cache, value_cache, group, window, sinks)
            continue
        if group.max_query == 1 and decode_kernels_apply(q):
            sink_logits = None if sinks is None else sinks.float().contiguous()
            out[group.token_index] = torch.ops.gptserve.paged_decode_attention(
                q[group.token_index].float().contiguous(), key_cache, value_cache, group.key_blocks,
                group.context_lens, group.block_size, window or 0, head_dim**-0.5, sink_logits).to(q.dtype)
            continue
        if window is not None:
            group = group.within(window)
        qg = q.new_zeros(group.num_seqs * group.max_query, num_heads, head_dim)
        qg[group.pad_index] = q[group.token_index]
        qg = qg.view(group.num_seqs, group.max_query, num_heads, head_dim).transpose(1, 2)
        kg = _gather_blocks(key_cache, group).to(q.dtype).transpose(1, 2)  # [S, KVH, L, D]
        vg = _gather_blocks(value_cache, group).to(q.dtype).transpose(1, 2)
        og = tiled_attention(qg, kg, vg, group, window, sinks)
        og = og.transpose(1, 2).reshape(group.num_seqs * group.max_query, num_heads, head_dim)
        out[group.token_index] = og[group.pad_index]
    return out


def tiled_attention(q: Tensor, k: Tensor, v: Tensor, group: AttentionGroup, window: int | None,
                    sinks: Tensor | None) -> Tensor:
    """SDPA of the group's padded q [S, H, Q, D] over its gathered k, v [S, KVH, L, D], causal and through
    ``window``; a long one-sequence chunk a tile of queries at a time, over the keys that tile may see."""
    mask = group.mask(window)
    if group.num_seqs > 1 or group.max_query <= QUERY_TILE:
        return masked_attention(q, k, v, mask, sinks)
    out = torch.empty_like(q)
    for queries, keys in group.query_tiles(window, QUERY_TILE):
        out[:, :, queries] = masked_attention(q[:, :, queries], k[:, :, keys], v[:, :, keys], mask[:, :, queries, keys],
                                              sinks)
    return out


def masked_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, sinks: Tensor | None) -> Tensor:
    if sinks is not None:
        return attention_with_sinks(q, k, v, mask, sinks)
    with sdpa_kernel(SDPA_BACKENDS):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def attention_with_sinks(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, sinks: Tensor) -> Tensor:
    """SDPA of q [S, H, Q, D] over k, v [S, KVH, L, D] under a boolean mask [S, 1, Q, L], plus a sink per head.

    The head dimension grows by a few zero columns (to a multiple of 8, the head sizes fused kernels take).
    In the first of them each query holds sink / scale, each real key 0, and one extra key 1: that key scores
    the sink (exactly where the scale is a power of two, as at head dim 64) and its value is zero. The real
    keys' scores are unchanged, and no per-head bias is built.
    """
    head_dim = q.shape[-1]
    scale = head_dim**-0.5
    pad = 8 - head_dim % 8
    q = F.pad(q, (0, pad))
    q[..., head_dim] = (sinks.to(q.dtype) / scale).view(1, -1, 1)
    k = F.pad(k, (0, pad, 0, 1))
    k[:, :, -1, head_dim] = 1.0
    v = F.pad(v, (0, pad, 0, 1))
    mask = F.pad(mask, (0, 1), value=True)
    with sdpa_kernel(SDPA_BACKENDS):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True, scale=scale)
    return out[..., :head_dim]


def _gather_blocks(cache: Tensor, group: AttentionGroup) -> Tensor:
    """The group's keys (or values) as [S, L, KVH, D], copied a whole block at a time."""
    kv_heads, head_dim = cache.shape[1], cache.shape[2]
    blocks = cache.view(-1, group.block_size, kv_heads, head_dim).index_select(0, group.key_blocks.flatten())
    return blocks.view(group.num_seqs, group.num_key_positions, kv_heads, head_dim)


def triton_attention_applies(device: torch.device) -> bool:
    """On CUDA, attention reads the pool through the Triton kernel, where Triton is installed (torch's CUDA
    wheels bring it). A decode row then reads only the blocks its context fills, however wide its table."""
    return device.type == "cuda" and _triton_installed()


@functools.cache
def _triton_installed() -> bool:
    if importlib.util.find_spec("triton") is None:
        log.warning("Triton is not installed: CUDA attention gathers the KV cache into padded copies")
        return False
    return True


def triton_attention(
    q: Tensor, key_cache: Tensor, value_cache: Tensor, group: AttentionGroup, window: int | None, sinks: Tensor | None
) -> Tensor:
    """The group's rows of q [T, H, D] -> [group tokens, H, D], keys and values read in place from the pool.

    The kernel takes queries laid out [seqs, max_query], as the flat rows of a decode group or a prefill chunk
    already are (every sequence in it has max_query of them)."""
    from models.triton_paged_attention import paged_attention as kernel

    num_heads, head_dim = q.shape[1], q.shape[2]
    rows = q[group.token_index].view(group.num_seqs, group.max_query, num_heads, head_dim)
    sink_logits = None if sinks is None else sinks.float().contiguous()
    out = kernel(rows, key_cache, value_cache, group.key_blocks, group.context_lens, group.query_positions,
                 group.block_size, window or 0, head_dim**-0.5, sink_logits)
    return out.view(-1, num_heads, head_dim)
