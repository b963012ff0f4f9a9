"""GPT-OSS decode steps with packed experts on CPU: one C++ call per layer (models/csrc/gpt_oss_decode_layer.cpp).

In the two CPU modes whose linears stream bf16 weights through this project's kernels (``--dtype bfloat16`` on
a CPU with AVX512-BF16 and no AMX, and ``--cpu-weight-dtype bfloat16`` in float32), a layer's five matrix
products at one token run in C++ kernels, and the ~150 torch ops between them (norms, rotary, the KV write,
routing, grouping, SwiGLU, the weighted sum of the picks) each cost a dispatch, an allocation and an
interpreter round trip: ~1.1 ms of a ~7.5 ms layer of the gpt-oss-20b widths on two Xeon cores (bench/NOTES.md,
session 18). The fused layer does those ops' arithmetic where they do it and calls the same kernels, so a decode
step's time is its weights' reads plus little else. Prefill, larger batches and the other modes keep the modules.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from models.bf16_dot_linear import Bf16DotLinear
from models.bf16_weight_linear import Bf16WeightLinear
from models.forward_batch import KVView
from models.moe import MoE
from models.mxfp4 import BF16_KERNEL_MAX_ROWS, takes_bf16_dots


def fused_layer_weights(norms: tuple[Tensor, Tensor], qkv: nn.Module, out: nn.Module, sinks: Tensor,
                        moe: MoE) -> list[Tensor] | None:
    """The kernel's weight list for one layer (its two norms' scales, attention's linears and sinks, the MoE), or
    None where its linears are not the bf16-streaming ones, its experts not packed, or it runs on several ranks
    (fp32 weights, AMX's oneDNN layers, a GPU, tensor parallel)."""
    experts = moe.experts
    qkv_weights, out_weights, router_weights = (_packed_and_bias(layer) for layer in (qkv, out, moe.router))
    if qkv_weights is None or out_weights is None or router_weights is None:
        return None
    if not experts.packed or moe.tp.world_size != 1:
        return None
    gate_up_bias, down_bias = experts.float_biases
    return [norms[0], *qkv_weights, *out_weights, sinks.float().contiguous(), norms[1], *router_weights,
            experts.gate_up_blocks, experts.gate_up_scales, gate_up_bias, experts.down_blocks, experts.down_scales,
            down_bias]


def _packed_and_bias(layer: nn.Module) -> tuple[Tensor, Tensor] | None:
    """The bf16 weight as the kernels read it (one layout for both layers) and the fp32 bias."""
    if type(layer) is Bf16DotLinear or type(layer) is Bf16WeightLinear:
        if layer.packed is not None and layer.bias is not None:
            return layer.packed, layer.bias
    return None


def fused_decode_applies(x: Tensor, kv: KVView) -> bool:
    """A step of at most BF16_KERNEL_MAX_ROWS single decode tokens: in bf16 on a CPU whose kernels dot bf16, or in
    float32 on CPU. Within that bound each expert's share takes the rows' kernel, as the modules would choose."""
    if len(kv.groups) != 1 or not (takes_bf16_dots(x) or (x.device.type == "cpu" and x.dtype == torch.float32)):
        return False
    group = kv.groups[0]
    return group.max_query == 1 and group.num_seqs == x.shape[0] <= BF16_KERNEL_MAX_ROWS


def fused_decode_layer(
    x: Tensor, weights: list[Tensor], cos: Tensor, sin: Tensor, kv: KVView, cache: tuple[Tensor, Tensor], *,
    window: int | None, head_dim: int, eps: float, moe: MoE,
) -> Tensor:
    group = kv.groups[0]
    return torch.ops.gptserve.gpt_oss_decode_layer(
        x.contiguous(), weights, cache[0], cache[1], kv.slot_mapping, group.key_blocks, group.context_lens,
        cos.contiguous(), sin.contiguous(), group.block_size, window or 0, len(weights[5]), head_dim, eps,
        moe.experts_per_token, moe.experts.alpha, moe.experts.limit)
