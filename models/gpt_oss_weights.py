"""Where each GPT-OSS parameter comes from in the two checkpoint layouts, and how it is converted on the way.

Both layouts store experts the same way: MXFP4 blocks of the [out, in] matrices, gate and linear rows
interleaved. The HF layout splits the fused qkv projection into q/k/v_proj, and when it stores float
experts it stores them transposed ([E, in, out]). Tensors are read one at a time, so loading holds no
second copy of the model; dequantized experts are built one expert at a time.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

from models.checkpoint import Checkpoint, CheckpointError
from models.gpt_oss_config import GptOssConfig
from models.mxfp4 import VALUES_PER_BLOCK, dequantize_mxfp4, packed_shapes

# Our parameter name -> the checkpoint's, for tensors that load one to one.
HF_NAMES = {
    "embedding.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
    "layers.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "layers.{i}.attn.out.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "layers.{i}.attn.out.bias": "model.layers.{i}.self_attn.o_proj.bias",
    "layers.{i}.attn.sinks": "model.layers.{i}.self_attn.sinks",
    "layers.{i}.mlp_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "layers.{i}.moe.router.weight": "model.layers.{i}.mlp.router.weight",
    "layers.{i}.moe.router.bias": "model.layers.{i}.mlp.router.bias",
    "layers.{i}.moe.experts.gate_up_blocks": "model.layers.{i}.mlp.experts.gate_up_proj_blocks",
    "layers.{i}.moe.experts.gate_up_scales": "model.layers.{i}.mlp.experts.gate_up_proj_scales",
    "layers.{i}.moe.experts.gate_up_bias": "model.layers.{i}.mlp.experts.gate_up_proj_bias",
    "layers.{i}.moe.experts.down_blocks": "model.layers.{i}.mlp.experts.down_proj_blocks",
    "layers.{i}.moe.experts.down_scales": "model.layers.{i}.mlp.experts.down_proj_scales",
    "layers.{i}.moe.experts.down_bias": "model.layers.{i}.mlp.experts.down_proj_bias",
}
HF_FLOAT_EXPERTS = {
    "gate_up": "model.layers.{i}.mlp.experts.gate_up_proj",
    "down": "model.layers.{i}.mlp.experts.down_proj",
}

ORIGINAL_NAMES = {
    "embedding.weight": "embedding.weight",
    "norm.weight": "norm.scale",
    "lm_head.weight": "unembedding.weight",
    "layers.{i}.attn_norm.weight": "block.{i}.attn.norm.scale",
    "layers.{i}.attn.qkv.weight": "block.{i}.attn.qkv.weight",
    "layers.{i}.attn.qkv.bias": "block.{i}.attn.qkv.bias",
    "layers.{i}.attn.out.weight": "block.{i}.attn.out.weight",
    "layers.{i}.attn.out.bias": "block.{i}.attn.out.bias",
    "layers.{i}.attn.sinks": "block.{i}.attn.sinks",
    "layers.{i}.mlp_norm.weight": "block.{i}.mlp.norm.scale",
    "layers.{i}.moe.router.weight": "block.{i}.mlp.gate.weight",
    "layers.{i}.moe.router.bias": "block.{i}.mlp.gate.bias",
    "layers.{i}.moe.experts.gate_up_blocks": "block.{i}.mlp.mlp1_weight.blocks",
    "layers.{i}.moe.experts.gate_up_scales": "block.{i}.mlp.mlp1_weight.scales",
    "layers.{i}.moe.experts.gate_up_bias": "block.{i}.mlp.mlp1_bias",
    "layers.{i}.moe.experts.down_blocks": "block.{i}.mlp.mlp2_weight.blocks",
    "layers.{i}.moe.experts.down_scales": "block.{i}.mlp.mlp2_weight.scales",
    "layers.{i}.moe.experts.down_bias": "block.{i}.mlp.mlp2_bias",
}


def stores_mxfp4(checkpoint: Checkpoint, original: bool) -> bool:
    names = ORIGINAL_NAMES if original else HF_NAMES
    return checkpoint.has(names["layers.{i}.moe.experts.gate_up_blocks"].format(i=0))


def read_state(
    checkpoint: Checkpoint,
    config: GptOssConfig,
    original: bool,
    shapes: dict[str, tuple[int, ...]],
    dtype: torch.dtype,
    device: torch.device,
) -> dict[str, Tensor]:
    """The tensor for each of the model's parameters (``shapes``: name -> shape), in the dtypes it computes in."""
    names = ORIGINAL_NAMES if original else HF_NAMES
    if stores_mxfp4(checkpoint, original) and (
        config.hidden_size % VALUES_PER_BLOCK or config.intermediate_size % VALUES_PER_BLOCK
    ):
        raise CheckpointError(
            f"config.json: MXFP4 experts need hidden_size and intermediate_size divisible by {VALUES_PER_BLOCK}"
        )
    state = {}
    for name, shape in shapes.items():
        match = re.match(r"layers\.(\d+)\.", name)
        layer = match.group(1) if match else ""
        pattern = re.sub(r"^layers\.\d+\.", "layers.{i}.", name)
        if pattern in names:
            state[name] = checkpoint.get(names[pattern].format(i=layer), shape, _stored_dtype(name, dtype), device)
        elif pattern.startswith("layers.{i}.attn.qkv."):
            state[name] = _hf_qkv(checkpoint, config, layer, pattern.rsplit(".", 1)[1], dtype, device)
        else:
            which = pattern.rsplit(".", 1)[1]  # a dense expert matrix: "gate_up" or "down"
            state[name] = _dense_experts(checkpoint, names, original, layer, which, shape, dtype, device)
    return state


def _stored_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    """Norm scales stay float32 (the reference computes norms in float32); MXFP4 stays packed bytes."""
    if name.endswith(("_blocks", "_scales")):
        return torch.uint8
    return torch.float32 if name.endswith("norm.weight") else dtype


def _hf_qkv(
    checkpoint: Checkpoint, config: GptOssConfig, layer: str, kind: str, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """The fused qkv weight or bias, from the HF layout's separate q_proj, k_proj and v_proj."""
    sizes = [config.num_heads * config.head_dim] + 2 * [config.num_kv_heads * config.head_dim]
    trailing = (config.hidden_size,) if kind == "weight" else ()
    parts = [
        checkpoint.get(f"model.layers.{layer}.self_attn.{p}_proj.{kind}", (size, *trailing), dtype, device)
        for p, size in zip("qkv", sizes)
    ]
    return torch.cat(parts)


def _dense_experts(
    checkpoint: Checkpoint,
    names: dict[str, str],
    original: bool,
    layer: str,
    which: str,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device,
) -> Tensor:
    """Expert matrices [E, out, in] as float: dequantized from MXFP4, or the HF layout's float [E, in, out]."""
    blocks_name = names[f"layers.{{i}}.moe.experts.{which}_blocks"].format(i=layer)
    if checkpoint.has(blocks_name) or original:
        scales_name = names[f"layers.{{i}}.moe.experts.{which}_scales"].format(i=layer)
        blocks_shape, scales_shape = packed_shapes(shape)
        blocks = checkpoint.get(blocks_name, blocks_shape, device=device)
        scales = checkpoint.get(scales_name, scales_shape, device=device)
        out = torch.empty(shape, dtype=dtype, device=device)
        for expert in range(shape[0]):
            out[expert] = dequantize_mxfp4(blocks[expert], scales[expert], dtype)
        return out
    name = HF_FLOAT_EXPERTS[which].format(i=layer)
    return checkpoint.get(name, (shape[0], shape[2], shape[1]), dtype, device).transpose(1, 2).contiguous()
