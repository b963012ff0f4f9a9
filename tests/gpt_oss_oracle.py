"""transformers' GptOssForCausalLM (fp32, eager attention) on a tiny checkpoint's weights: the oracle GPT-OSS
tests compare against, token for token."""

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import GptOssConfig as HFGptOssConfig, GptOssForCausalLM
from transformers.integrations.mxfp4 import convert_moe_packed_tensors


def transformers_gpt_oss(checkpoint_dir: Path) -> GptOssForCausalLM:
    """The HF-layout checkpoint in ``checkpoint_dir``; experts dequantized by transformers' own MXFP4 code."""
    config = json.loads((checkpoint_dir / "config.json").read_text())
    config.pop("quantization_config", None)
    hf_config = HFGptOssConfig(**config)
    hf_config._attn_implementation = "eager"
    state: dict[str, torch.Tensor] = {}
    for shard in checkpoint_dir.glob("*.safetensors"):
        state |= load_file(shard)
    for blocks_name in [name for name in state if name.endswith("_blocks")]:
        base = blocks_name.removesuffix("_blocks")
        blocks, scales = state.pop(blocks_name), state.pop(base + "_scales")
        state[base] = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
    oracle = GptOssForCausalLM(hf_config)
    oracle.load_state_dict({name: t.float() for name, t in state.items()}, strict=True)
    oracle.generation_config.eos_token_id = None
    return oracle.eval()
