"""Tiny random-weight GPT-OSS checkpoints in the layouts openai/gpt-oss-20b ships: HF and ``original/``.

Experts are drawn directly as MXFP4 blocks and scales, so their float values are exactly what any loader
decodes. Other weights are stored as the real checkpoints store them (bfloat16, norm scales float32) unless
``weights_dtype`` says otherwise; a float32 model loaded from them computes on exactly those values. Scales
are large enough that logits are far from flat and greedy choices are well separated.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from models.mxfp4 import dequantize_mxfp4, packed_shapes
from models.testing.gpt2_checkpoint import write_safetensors
from models.testing.tokenizer_files import write_gpt_oss_tokenizer

LAYOUTS = ("hf", "original", "hf+original")

# HF config keys, at tiny sizes; the vocabulary is the real o200k_harmony one.
TINY_CONFIG = {
    "vocab_size": 201088,
    "hidden_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "intermediate_size": 64,
    "num_local_experts": 8,
    "num_experts_per_tok": 4,
    "sliding_window": 8,
    "initial_context_length": 4096,
    "max_position_embeddings": 131072,
    "rope_theta": 150000.0,
    "rope_scaling_factor": 32.0,
    "rope_beta_fast": 32.0,
    "rope_beta_slow": 1.0,
    "swiglu_limit": 7.0,
    "rms_norm_eps": 1e-05,
}


def tiny_gpt_oss_tensors(config: dict, seed: int, weights_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Original-layout names: fused qkv, MXFP4 ``mlp1_weight`` [E, 2I, H] and ``mlp2_weight`` [E, H, I]."""
    g = torch.Generator().manual_seed(seed)
    hidden, inter, experts = config["hidden_size"], config["intermediate_size"], config["num_local_experts"]
    qkv_dim = config["head_dim"] * (config["num_attention_heads"] + 2 * config["num_key_value_heads"])

    def normal(*shape: int, std: float) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * std).to(weights_dtype)

    def mxfp4(*shape: int, large_fraction: float = 0.0) -> dict[str, torch.Tensor]:
        """Scales 2^-6 .. 2^-4 (outputs of order one at these widths); ``large_fraction`` of blocks at 2^-2."""
        blocks_shape, scales_shape = packed_shapes(shape)
        scales = torch.randint(121, 124, scales_shape, generator=g, dtype=torch.uint8)
        scales[torch.rand(scales_shape, generator=g) < large_fraction] = 125
        return {"blocks": torch.randint(0, 256, blocks_shape, generator=g, dtype=torch.uint8), "scales": scales}

    def norm_scale() -> torch.Tensor:
        return torch.randn(hidden, generator=g) * 0.1 + 1.0  # float32, as the real checkpoints keep norms

    tensors = {"embedding.weight": normal(config["vocab_size"], hidden, std=1.0)}
    for i in range(config["num_hidden_layers"]):
        b = f"block.{i}."
        tensors |= {
            b + "attn.norm.scale": norm_scale(),
            b + "attn.qkv.weight": normal(qkv_dim, hidden, std=0.2),
            b + "attn.qkv.bias": normal(qkv_dim, std=0.1),
            b + "attn.sinks": normal(config["num_attention_heads"], std=1.0),
            b + "attn.out.weight": normal(hidden, config["num_attention_heads"] * config["head_dim"], std=0.1),
            b + "attn.out.bias": normal(hidden, std=0.1),
            b + "mlp.norm.scale": norm_scale(),
            b + "mlp.gate.weight": normal(experts, hidden, std=0.3),
            b + "mlp.gate.bias": normal(experts, std=0.1),
            b + "mlp.mlp1_bias": normal(experts, 2 * inter, std=0.1),
            b + "mlp.mlp2_bias": normal(experts, hidden, std=0.1),
        }
        # A few large gate_up blocks push some activations past the SwiGLU clamp.
        mlp1 = mxfp4(experts, 2 * inter, hidden, large_fraction=1 / 16)
        tensors |= {b + f"mlp.mlp1_weight.{k}": v for k, v in mlp1.items()}
        tensors |= {b + f"mlp.mlp2_weight.{k}": v for k, v in mxfp4(experts, hidden, inter).items()}
    tensors |= {"norm.scale": norm_scale(), "unembedding.weight": normal(config["vocab_size"], hidden, std=0.3)}
    return tensors


def hf_tensors(original: dict[str, torch.Tensor], config: dict, float_experts: bool) -> dict[str, torch.Tensor]:
    """The same weights under HF names: q/k/v split apart; experts keep their MXFP4 blocks and scales, or
    with ``float_experts`` are stored dequantized and transposed to [E, in, out], as HF's unpacked export has them."""
    q_dim = config["head_dim"] * config["num_attention_heads"]
    kv_dim = config["head_dim"] * config["num_key_value_heads"]
    tensors = {
        "model.embed_tokens.weight": original["embedding.weight"],
        "model.norm.weight": original["norm.scale"],
        "lm_head.weight": original["unembedding.weight"],
    }
    for i in range(config["num_hidden_layers"]):
        b, m = f"block.{i}.", f"model.layers.{i}."
        for kind in ("weight", "bias"):
            q, k, v = original[b + f"attn.qkv.{kind}"].split([q_dim, kv_dim, kv_dim])
            tensors |= {m + f"self_attn.{name}_proj.{kind}": t.clone() for name, t in zip("qkv", (q, k, v))}
            tensors[m + f"self_attn.o_proj.{kind}"] = original[b + f"attn.out.{kind}"]
            tensors[m + f"mlp.router.{kind}"] = original[b + f"mlp.gate.{kind}"]
        tensors |= {
            m + "input_layernorm.weight": original[b + "attn.norm.scale"],
            m + "post_attention_layernorm.weight": original[b + "mlp.norm.scale"],
            m + "self_attn.sinks": original[b + "attn.sinks"],
            m + "mlp.experts.gate_up_proj_bias": original[b + "mlp.mlp1_bias"],
            m + "mlp.experts.down_proj_bias": original[b + "mlp.mlp2_bias"],
        }
        for hf_name, ours in (("gate_up_proj", "mlp1_weight"), ("down_proj", "mlp2_weight")):
            blocks, scales = original[b + f"mlp.{ours}.blocks"], original[b + f"mlp.{ours}.scales"]
            if float_experts:
                weight = dequantize_mxfp4(blocks, scales, original[b + "mlp.mlp1_bias"].dtype)
                tensors[m + f"mlp.experts.{hf_name}"] = weight.transpose(1, 2).contiguous()
            else:
                tensors |= {m + f"mlp.experts.{hf_name}_blocks": blocks, m + f"mlp.experts.{hf_name}_scales": scales}
    return tensors


def hf_config_json(config: dict, float_experts: bool = False) -> dict:
    """config.json with the keys and values openai/gpt-oss-20b's has, at ``config``'s sizes."""
    layers = config["num_hidden_layers"]
    layer_types = config.get("layer_types") or [
        "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)
    ]
    quantization = {
        "modules_to_not_convert": [
            "model.layers.*.self_attn",
            "model.layers.*.mlp.router",
            "model.embed_tokens",
            "lm_head",
        ],
        "quant_method": "mxfp4",
    }
    return {
        "architectures": ["GptOssForCausalLM"],
        "attention_bias": True,
        "attention_dropout": 0.0,
        "eos_token_id": 200002,
        "experts_per_token": config["num_experts_per_tok"],
        "head_dim": config["head_dim"],
        "hidden_act": "silu",
        "hidden_size": config["hidden_size"],
        "initial_context_length": config["initial_context_length"],
        "initializer_range": 0.02,
        "intermediate_size": config["intermediate_size"],
        "layer_types": layer_types,
        "max_position_embeddings": config["max_position_embeddings"],
        "model_type": "gpt_oss",
        "num_attention_heads": config["num_attention_heads"],
        "num_experts_per_tok": config["num_experts_per_tok"],
        "num_hidden_layers": layers,
        "num_key_value_heads": config["num_key_value_heads"],
        "num_local_experts": config["num_local_experts"],
        "output_router_logits": False,
        "pad_token_id": 199999,
        **({} if float_experts else {"quantization_config": quantization}),
        "rms_norm_eps": config["rms_norm_eps"],
        "rope_scaling": {
            "beta_fast": config["rope_beta_fast"],
            "beta_slow": config["rope_beta_slow"],
            "factor": config["rope_scaling_factor"],
            "original_max_position_embeddings": config["initial_context_length"],
            "rope_type": "yarn",
            "truncate": False,
        },
        "rope_theta": config["rope_theta"],
        "router_aux_loss_coef": 0.9,
        "sliding_window": config["sliding_window"],
        "swiglu_limit": config["swiglu_limit"],
        "tie_word_embeddings": False,
        "use_cache": True,
        "vocab_size": config["vocab_size"],
    }


def original_config_json(config: dict) -> dict:
    """The original layout's config.json; it cannot say which layers slide, nor the norm epsilon."""
    layer_types = hf_config_json(config)["layer_types"]
    if any((t == "sliding_attention") != (i % 2 == 0) for i, t in enumerate(layer_types)):
        raise ValueError("the original layout slides every even layer; layer_types must alternate")
    if config["rms_norm_eps"] != 1e-5:
        raise ValueError("the original layout's norm epsilon is always 1e-5")
    return {
        "num_hidden_layers": config["num_hidden_layers"],
        "num_experts": config["num_local_experts"],
        "experts_per_token": config["num_experts_per_tok"],
        "vocab_size": config["vocab_size"],
        "hidden_size": config["hidden_size"],
        "intermediate_size": config["intermediate_size"],
        "swiglu_limit": config["swiglu_limit"],
        "head_dim": config["head_dim"],
        "num_attention_heads": config["num_attention_heads"],
        "num_key_value_heads": config["num_key_value_heads"],
        "sliding_window": config["sliding_window"],
        "initial_context_length": config["initial_context_length"],
        "rope_theta": config["rope_theta"],
        "rope_scaling_factor": config["rope_scaling_factor"],
        "rope_ntk_alpha": config["rope_beta_slow"],
        "rope_ntk_beta": config["rope_beta_fast"],
    }


def _dtype_tag(tensor: torch.Tensor, name: str) -> str:
    if name.endswith(".blocks"):
        return "FP4"
    if name.endswith(".scales"):
        return "UE8"
    return {torch.bfloat16: "BF16", torch.float32: "FP32", torch.float16: "FP16"}[tensor.dtype]


def _write_original(out_dir: Path, tensors: dict[str, torch.Tensor], config: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(original_config_json(config), indent=2))
    (out_dir / "dtypes.json").write_text(json.dumps({n: _dtype_tag(t, n) for n, t in tensors.items()}, indent=2))
    save_file(tensors, out_dir / "model.safetensors")


def _write_hf(out_dir: Path, tensors: dict[str, torch.Tensor], config: dict, float_experts: bool) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(hf_config_json(config, float_experts), indent=2))
    generation = {
        "bos_token_id": 199998,
        "do_sample": True,
        "eos_token_id": [200002, 199999, 200012],
        "pad_token_id": 199999,
    }
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2))
    write_safetensors(out_dir, hf_tensors(tensors, config, float_experts), shards=3)
    write_gpt_oss_tokenizer(out_dir)


def write_tiny_gpt_oss(
    out_dir: Path,
    *,
    layout: str = "hf",
    seed: int = 0,
    weights_dtype: torch.dtype = torch.bfloat16,
    float_experts: bool = False,
    **config_overrides,
) -> Path:
    """Write a tiny checkpoint and return the directory to load.

    ``layout``: "hf" (config, 3 shards + index, generation config, tokenizer), "original" (config.json,
    dtypes.json, model.safetensors, plus the tokenizer so the folder serves on its own) or "hf+original"
    (the HF layout with the same weights in ``original/``, like the real repository). ``float_experts``
    (HF layout only) stores the experts' values as float tensors instead of MXFP4. ``config_overrides``
    are keys of TINY_CONFIG (or ``layer_types``).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}: choose one of {', '.join(LAYOUTS)}")
    if float_experts and layout != "hf":
        raise ValueError("float experts exist only in the HF layout")
    unknown = config_overrides.keys() - TINY_CONFIG.keys() - {"layer_types"}
    if unknown:
        raise ValueError(f"unknown config keys: {sorted(unknown)}")
    config = TINY_CONFIG | config_overrides
    tensors = tiny_gpt_oss_tensors(config, seed, weights_dtype)
    if layout == "original":
        _write_original(out_dir, tensors, config)
        write_gpt_oss_tokenizer(out_dir)
        return out_dir
    _write_hf(out_dir, tensors, config, float_experts)
    if layout == "hf+original":
        _write_original(out_dir / "original", tensors, config)
    return out_dir
