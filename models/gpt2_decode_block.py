"""GPT-2 decode steps on CPU with bf16-streamed weights: one C++ call per block (models/csrc/gpt2_decode_block.cpp).

A batch-1 decode step of GPT-2-124M streams ~250 MB of bf16 weights, ~8.5 ms on two cores at memory speed.
Run as torch modules, each block adds some twenty small ops (LayerNorms, the KV write, attention's pieces,
GELU, residual adds), each an interpreter round trip, a dispatch and an allocation: ~3 ms a step, a quarter of
it. The fused block does the modules' arithmetic on the same bf16 weights in one call, so a decode step's time
is the weights' streaming time plus little else. It serves both modes whose linears stream packed bf16 weights:
float32 activations (``--cpu-weight-dtype bfloat16``, Bf16WeightLinear) and bf16 ones (a bf16 model on a CPU
with AVX512-BF16 and no AMX, Bf16DotLinear). Prefill and larger batches keep the modules.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from models.bf16_dot_linear import Bf16DotLinear
from models.bf16_weight_linear import KERNEL_MAX_ROWS, Bf16WeightLinear
from models.forward_batch import KVView

# Each mode's linear layer, by the dtype of the activations (and so of the LayerNorms) it takes.
FUSED_LINEARS: dict[torch.dtype, type[Bf16WeightLinear | Bf16DotLinear]] = {
    torch.float32: Bf16WeightLinear, torch.bfloat16: Bf16DotLinear}


def fused_block_weights(ln_1: nn.LayerNorm, attn: nn.Module, ln_2: nn.LayerNorm, mlp: nn.Module) -> list[Tensor] | None:
    """The kernel's weight list for one block, or None where its linears are not all the bf16-streamed kind of
    its dtype (fp32 weights, oneDNN's, a GPU, tensor parallel's row-parallel layers, kernels that failed to
    build)."""
    kind = FUSED_LINEARS.get(ln_1.weight.dtype)
    if kind is None:
        return None
    linears = [layer for layer in (attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj)
               if isinstance(layer, kind) and layer.packed is not None and layer.bias is not None]
    if len(linears) != 4 or ln_1.bias is None or ln_2.bias is None:
        return None
    qkv, proj, fc, fc_proj = linears
    weights = [ln_1.weight, ln_1.bias, qkv.packed, qkv.bias, proj.packed, proj.bias,
               ln_2.weight, ln_2.bias, fc.packed, fc.bias, fc_proj.packed, fc_proj.bias]
    return [w for w in weights if w is not None]


def fused_decode_applies(h: Tensor, kv: KVView) -> bool:
    """A step of single decode tokens only, few enough for the bf16 weight kernel (the limit both modes share)."""
    if len(kv.groups) != 1:
        return False
    group = kv.groups[0]
    return group.max_query == 1 and group.num_seqs == h.shape[0] <= KERNEL_MAX_ROWS


def fused_decode_block(
    h: Tensor, weights: list[Tensor], cache: tuple[Tensor, Tensor], kv: KVView, num_heads: int, eps: float
) -> Tensor:
    group = kv.groups[0]
    return torch.ops.gptserve.gpt2_decode_block(
        h.contiguous(), weights, cache[0], cache[1], kv.slot_mapping, group.key_blocks, group.context_lens,
        group.block_size, num_heads, eps)
