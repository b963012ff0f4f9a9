"""GPT-OSS configuration, read from either config.json the checkpoints ship.

HF layout (``model_type: gpt_oss``): num_local_experts, num_experts_per_tok, layer_types, rope_scaling
(or rope_parameters). Original layout (the repository's ``original/`` folder): num_experts,
experts_per_token, rope_scaling_factor, rope_ntk_alpha/beta, and sliding attention on every even layer.
"""

from __future__ import annotations

from dataclasses import dataclass

from models.checkpoint import CheckpointError, config_float, config_int

SLIDING, FULL = "sliding_attention", "full_attention"


def is_original_gpt_oss_config(config: dict) -> bool:
    """True for the config.json of the original layout (no model_type; the reference's own key names)."""
    return "model_type" not in config and {"num_experts", "experts_per_token", "rope_scaling_factor"} <= config.keys()


@dataclass(frozen=True, slots=True)
class GptOssConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    num_experts: int
    experts_per_token: int
    sliding_window: int
    sliding_layers: tuple[bool, ...]  # per layer: does it attend only the last sliding_window positions
    rope_theta: float
    rope_factor: float
    rope_original_context: int
    rope_beta_fast: float
    rope_beta_slow: float
    rope_truncate: bool
    swiglu_alpha: float
    swiglu_limit: float
    rms_norm_eps: float
    max_position_embeddings: int

    @classmethod
    def from_hf(cls, config: dict) -> GptOssConfig:
        rope = config.get("rope_scaling") or config.get("rope_parameters") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("yarn", "default"):
            raise CheckpointError(f"config.json: rope_type={rope_type!r} is not supported (expected yarn)")
        for unsupported in ("attention_factor", "mscale", "mscale_all_dim"):
            if rope.get(unsupported) is not None:
                raise CheckpointError(f"config.json: rope_scaling.{unsupported} is not supported")
        yarn = rope_type == "yarn"
        num_layers = config_int(config, "num_hidden_layers", high=1024)
        layer_types = config.get("layer_types") or [SLIDING if i % 2 == 0 else FULL for i in range(num_layers)]
        if len(layer_types) != num_layers or not set(layer_types) <= {SLIDING, FULL}:
            raise CheckpointError(f"config.json: layer_types must list {num_layers} of {SLIDING!r} / {FULL!r}")
        num_experts = config_int(config, "num_local_experts", default=config.get("num_experts"))
        return cls._checked(
            config,
            num_layers=num_layers,
            num_experts=num_experts,
            experts_per_token=config_int(
                config, "num_experts_per_tok", high=num_experts, default=config.get("experts_per_token")
            ),
            sliding_layers=tuple(t == SLIDING for t in layer_types),
            rope_theta=config_float(rope if "rope_theta" in rope else config, "rope_theta", 1.0, 1e12),
            rope_factor=config_float(rope, "factor", 1.0, 1e6) if yarn else 1.0,
            rope_original_context=config_int(
                rope, "original_max_position_embeddings", default=config.get("initial_context_length", 4096)
            ),
            rope_beta_fast=config_float(rope, "beta_fast", 1e-3, 1e6, default=32.0),
            rope_beta_slow=config_float(rope, "beta_slow", 1e-3, 1e6, default=1.0),
            rope_truncate=bool(rope.get("truncate", True)),
            swiglu_alpha=config_float(config, "swiglu_alpha", 0.0, 1e3, default=1.702),
            rms_norm_eps=config_float(config, "rms_norm_eps", 0.0, 1.0, default=1e-5),
            max_position_embeddings=config_int(config, "max_position_embeddings"),
        )

    @classmethod
    def from_original(cls, config: dict) -> GptOssConfig:
        num_layers = config_int(config, "num_hidden_layers", high=1024)
        num_experts = config_int(config, "num_experts")
        factor = config_float(config, "rope_scaling_factor", 1.0, 1e6)
        initial_context = config_int(config, "initial_context_length")
        return cls._checked(
            config,
            num_layers=num_layers,
            num_experts=num_experts,
            experts_per_token=config_int(config, "experts_per_token", high=num_experts),
            # Sliding window only on every other layer, starting with the first.
            sliding_layers=tuple(i % 2 == 0 for i in range(num_layers)),
            rope_theta=config_float(config, "rope_theta", 1.0, 1e12),
            rope_factor=factor,
            rope_original_context=initial_context,
            rope_beta_fast=config_float(config, "rope_ntk_beta", 1e-3, 1e6, default=32.0),
            rope_beta_slow=config_float(config, "rope_ntk_alpha", 1e-3, 1e6, default=1.0),
            rope_truncate=False,
            swiglu_alpha=1.702,
            rms_norm_eps=1e-5,
            max_position_embeddings=int(initial_context * factor),
        )

    @classmethod
    def _checked(cls, config: dict, **values) -> GptOssConfig:
        """Adds and checks the keys both layouts name alike."""
        hidden = config_int(config, "hidden_size")
        num_heads = config_int(config, "num_attention_heads", high=hidden)
        num_kv_heads = config_int(config, "num_key_value_heads", high=num_heads)
        if num_heads % num_kv_heads:
            raise CheckpointError(
                f"config.json: num_attention_heads={num_heads} is not a multiple of num_key_value_heads={num_kv_heads}"
            )
        head_dim = config_int(config, "head_dim", default=hidden // num_heads)
        if head_dim % 2:
            raise CheckpointError(f"config.json: head_dim={head_dim} must be even for rotary embeddings")
        return cls(
            vocab_size=config_int(config, "vocab_size"),
            hidden_size=hidden,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            intermediate_size=config_int(config, "intermediate_size"),
            sliding_window=config_int(config, "sliding_window", default=128),
            swiglu_limit=config_float(config, "swiglu_limit", 0.0, 1e6, default=7.0),
            **values,
        )
