"""GPT-OSS decode steps in bf16 on CPUs with AVX512-BF16: one C++ call per layer (models/csrc/gpt_oss_decode_layer.cpp).

With ``--dtype bfloat16 --keep-experts-packed`` on such a CPU a layer's five matrix products run in the C++
kernels at one token, and the ~150 torch ops between them (norms, rotary, the KV write, routing, grouping,
SwiGLU, the weighted sum of the picks) each cost a dispatch, an allocation and an interpreter round trip:
~1.5 ms of a ~15 ms layer on two Xeon cores (bench/NOTES.md, session 18). The fused layer rounds to bf16
where those ops round and calls the same kernels, so a decode step's time is its weights' reads plus little
else. Prefill, larger batches and every other mode keep the modules.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from models.bf16_dot_linear import Bf16DotLinear
from models.forward_batch import KVView
from models.mxfp4 import BF16_KERNEL_MAX_ROWS, takes_bf16_dots

if TYPE_CHECKING:
    from models.gpt_oss import GptOssBlock


def fused_layer_weights(block: GptOssBlock) -> list[Tensor] | None:
    """The kernel's weight list for one layer, or None where the layer is not the vdpbf16ps one with packed
    experts on one rank (fp32 or bf16-weight modes, AMX's oneDNN layers, a GPU, tensor parallel)."""
    attn, moe, experts = block.attn, block.moe, block.moe.experts
    qkv, out, router = (_packed_and_bias(layer) for layer in (attn.qkv, attn.out, moe.router))
    if qkv is None or out is None or router is None or not experts.packed or moe.tp.world_size != 1:
        return None
    gate_up_bias, down_bias = experts.float_biases
    return [block.attn_norm.weight, *qkv, *out, attn.sinks.float().contiguous(), block.mlp_norm.weight, *router,
            experts.gate_up_blocks, experts.gate_up_scales, gate_up_bias, experts.down_blocks, experts.down_scales,
            down_bias]


def _packed_and_bias(layer: nn.Module) -> tuple[Tensor, Tensor] | None:
    if type(layer) is not Bf16DotLinear or layer.bias is None:
        return None
    return layer.packed, layer.bias


def fused_decode_applies(x: Tensor, kv: KVView) -> bool:
    """A step of single decode tokens only, in bf16, on a CPU whose expert kernel dots bf16 (each expert's share
    then stays within the rows its kernel takes, as the modules' choice would)."""
    if not takes_bf16_dots(x) or len(kv.groups) != 1:
        return False
    group = kv.groups[0]
    return group.max_query == 1 and group.num_seqs == x.shape[0] <= BF16_KERNEL_MAX_ROWS


def fused_decode_layer(
    block: GptOssBlock, weights: list[Tensor], x: Tensor, cos: Tensor, sin: Tensor, kv: KVView,
    cache: tuple[Tensor, Tensor],
) -> Tensor:
    group, attn, moe = kv.groups[0], block.attn, block.moe
    return torch.ops.gptserve.gpt_oss_decode_layer(
        x.contiguous(), weights, cache[0], cache[1], kv.slot_mapping, group.key_blocks, group.context_lens,
        cos.contiguous(), sin.contiguous(), group.block_size, attn.window or 0, len(attn.sinks), attn.head_dim,
        block.attn_norm.eps, moe.experts_per_token, moe.experts.alpha, moe.experts.limit)
