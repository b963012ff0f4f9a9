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
from models.moe import splits_by_experts
from models.mxfp4 import VALUES_PER_BLOCK, dequantize_mxfp4, packed_shapes
from models.parallel import SINGLE, TensorParallel

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


# Tensor parallel: the dimension of each split parameter that ranks divide (attention by heads; o-proj by input).
ATTENTION_SPLITS = {
    "layers.{i}.attn.qkv.weight": 0,
    "layers.{i}.attn.qkv.bias": 0,
    "layers.{i}.attn.sinks": 0,
    "layers.{i}.attn.out.weight": 1,
}
# Experts [E, out, in] (packed: [E, out, in / 32, 16]) are split by expert or, failing that, by the
# intermediate dimension: gate_up's rows, down's columns; down's bias is then added by rank 0 only.
EXPERT_NAMES = ("gate_up_blocks", "gate_up_scales", "gate_up_bias", "gate_up", "down_blocks", "down_scales",
                "down_bias", "down")
INTERMEDIATE_SPLITS = {"gate_up_blocks": 1, "gate_up_scales": 1, "gate_up_bias": 1, "gate_up": 1,
                       "down_blocks": 2, "down_scales": 2, "down": 2}


def split_dim(pattern: str, by_experts: bool) -> int | None:
    """The dimension of parameter ``pattern`` that tensor-parallel ranks divide; None: every rank holds it all."""
    if pattern in ATTENTION_SPLITS:
        return ATTENTION_SPLITS[pattern]
    which = pattern.removeprefix("layers.{i}.moe.experts.")
    if which not in EXPERT_NAMES:
        return None
    return 0 if by_experts else INTERMEDIATE_SPLITS.get(which)


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
    tp: TensorParallel = SINGLE,
) -> dict[str, Tensor]:
    """The tensor for each of the model's parameters (``shapes``: name -> shape, this rank's share of the split
    ones), in the dtypes it computes in."""
    names = ORIGINAL_NAMES if original else HF_NAMES
    by_experts = splits_by_experts(config.num_experts, tp)
    if stores_mxfp4(checkpoint, original) and (
        config.hidden_size % VALUES_PER_BLOCK or (config.intermediate_size // (1 if by_experts else tp.world_size))
        % VALUES_PER_BLOCK
    ):
        raise CheckpointError(
            f"config.json: MXFP4 experts need hidden_size and intermediate_size (divided by --tensor-parallel-size "
            f"when it does not divide num_experts) divisible by {VALUES_PER_BLOCK}"
        )
    qkv_parts = [config.num_heads * config.head_dim] + 2 * [config.num_kv_heads * config.head_dim]
    state = {}
    for name, shape in shapes.items():
        match = re.match(r"layers\.(\d+)\.", name)
        layer = match.group(1) if match else ""
        pattern = re.sub(r"^layers\.\d+\.", "layers.{i}.", name)
        dim = split_dim(pattern, by_experts) if tp.world_size > 1 else None
        if pattern in names:
            parts = qkv_parts if pattern.startswith("layers.{i}.attn.qkv.") else None
            stored = names[pattern].format(i=layer)
            state[name] = read_shard(checkpoint, stored, shape, dim, tp, _stored_dtype(name, dtype), device, parts)
        elif pattern.startswith("layers.{i}.attn.qkv."):
            state[name] = _hf_qkv(checkpoint, config, layer, pattern.rsplit(".", 1)[1], dtype, device, tp)
        else:
            which = pattern.rsplit(".", 1)[1]  # a dense expert matrix: "gate_up" or "down"
            state[name] = _dense_experts(checkpoint, names, original, layer, which, shape, dim, tp, dtype, device)
    return state


def read_shard(
    checkpoint: Checkpoint,
    name: str,
    shape: tuple[int, ...],
    dim: int | None,
    tp: TensorParallel,
    dtype: torch.dtype | None,
    device: torch.device,
    parts: list[int] | None = None,
) -> Tensor:
    """This rank's ``shape`` of tensor ``name``: all of it, or its slice of dimension ``dim``, whose fused
    ``parts`` (full sizes; default one part) are each split over the ranks."""
    if dim is None:
        return checkpoint.get(name, shape, dtype, device)
    full = list(shape)
    full[dim] *= tp.world_size
    ranges = tp.ranges(*(parts or [full[dim]]))
    return checkpoint.get_slices(name, dim, ranges, tuple(full), dtype, device)


def _stored_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    """Norm scales stay float32 (the reference computes norms in float32); MXFP4 stays packed bytes."""
    if name.endswith(("_blocks", "_scales")):
        return torch.uint8
    return torch.float32 if name.endswith("norm.weight") else dtype


def _hf_qkv(
    checkpoint: Checkpoint,
    config: GptOssConfig,
    layer: str,
    kind: str,
    dtype: torch.dtype,
    device: torch.device,
    tp: TensorParallel,
) -> Tensor:
    """The fused qkv weight or bias (this rank's heads), from the HF layout's separate q_proj, k_proj and v_proj."""
    sizes = [config.num_heads * config.head_dim] + 2 * [config.num_kv_heads * config.head_dim]
    trailing = (config.hidden_size,) if kind == "weight" else ()
    dim = 0 if tp.world_size > 1 else None
    parts = [
        read_shard(checkpoint, f"model.layers.{layer}.self_attn.{p}_proj.{kind}", (size // tp.world_size, *trailing),
                   dim, tp, dtype, device)
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
    dim: int | None,
    tp: TensorParallel,
    dtype: torch.dtype,
    device: torch.device,
) -> Tensor:
    """Expert matrices [E, out, in] as float (this rank's ``shape``, split along ``dim``): dequantized from
    MXFP4, or the HF layout's float [E, in, out]."""
    blocks_name = names[f"layers.{{i}}.moe.experts.{which}_blocks"].format(i=layer)
    if checkpoint.has(blocks_name) or original:
        scales_name = names[f"layers.{{i}}.moe.experts.{which}_scales"].format(i=layer)
        blocks_shape, scales_shape = packed_shapes(shape)
        blocks = read_shard(checkpoint, blocks_name, blocks_shape, dim, tp, None, device)
        scales = read_shard(checkpoint, scales_name, scales_shape, dim, tp, None, device)
        out = torch.empty(shape, dtype=dtype, device=device)
        for expert in range(shape[0]):
            out[expert] = dequantize_mxfp4(blocks[expert], scales[expert], dtype)
        return out
    name = HF_FLOAT_EXPERTS[which].format(i=layer)
    stored_dim = None if dim is None else (0, 2, 1)[dim]  # stored transposed
    stored = read_shard(checkpoint, name, (shape[0], shape[2], shape[1]), stored_dim, tp, dtype, device)
    return stored.transpose(1, 2).contiguous()
