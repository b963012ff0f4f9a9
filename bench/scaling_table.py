"""``python -m bench.scaling_table``: writes docs/scaling.md, gpt-oss-20b and -120b sharded over N = 1, 2, 4, 8 GPUs,
and the capacity plan (bench/capacity_plan.py) that builds on it.

Nothing is measured and nothing is typed in by hand: the configs are the real models' config.json values,
parsed by our own GptOssConfig, and every figure comes from the modules our loader would build on each rank
(``GptOss(config, tp=TensorParallel(rank, N))`` on the meta device: no memory is allocated), so the table
changes when the sharding does. tests/test_scaling_doc.py checks the document is this script's output.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from bench import capacity_plan
from models.gpt_oss import GptOss, GptOssConfig
from models.moe import MoE
from models.parallel import RowParallelLinear, TensorParallel

DOC = Path(__file__).resolve().parent.parent / "docs" / "scaling.md"
GIB = 2**30
GPU_BYTES = 80 * 10**9  # an "80 GB" H100/A100
USABLE = 0.9  # of GPU memory for weights + KV; the rest for activations, CUDA context, fragmentation
KV_TOKENS = 1000
ACTIVATION_BYTES = 2  # bfloat16, the GPU default

_SHARED = {
    "vocab_size": 201088, "hidden_size": 2880, "num_attention_heads": 64, "num_key_value_heads": 8,
    "head_dim": 64, "intermediate_size": 2880, "num_experts_per_tok": 4, "sliding_window": 128,
    "max_position_embeddings": 131072, "rope_theta": 150000.0, "swiglu_limit": 7.0, "rms_norm_eps": 1e-5,
    "rope_scaling": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                     "original_max_position_embeddings": 4096, "truncate": False},
}
MODELS = {
    "gpt-oss-20b": _SHARED | {"num_hidden_layers": 24, "num_local_experts": 32},
    "gpt-oss-120b": _SHARED | {"num_hidden_layers": 36, "num_local_experts": 128},
}
SIZES = (1, 2, 4, 8)
SERVING_KV_TOKENS = 64 * 4096  # a replica must hold this much KV besides its weights: 64 sequences of 4096


def weight_bytes(model: GptOss) -> int:
    """As loaded for a GPU: bf16 weights, float32 norm scales, MXFP4 blocks and scales as bytes."""
    total = 0
    for name, param in model.named_parameters():
        size = 1 if param.dtype == torch.uint8 else 4 if name.endswith("norm.weight") else 2
        total += param.numel() * size
    return total


def rank_model(config: GptOssConfig, packed: bool, rank: int, world_size: int) -> GptOss:
    with torch.device("meta"):
        return GptOss(config, packed_experts=packed, tp=TensorParallel(rank, world_size))


def all_reduces_per_forward(model: GptOss) -> int:
    return sum(isinstance(m, (RowParallelLinear, MoE)) for m in model.modules())


def model_section(name: str, raw: dict) -> list[str]:
    config = GptOssConfig.from_hf(raw)
    lines = [
        f"## {name}",
        "",
        f"{config.num_layers} layers, hidden {config.hidden_size}, {config.num_heads} query / {config.num_kv_heads} KV "
        f"heads of {config.head_dim}, {config.num_experts} experts (top-{config.experts_per_token}) of intermediate "
        f"{config.intermediate_size}, vocabulary {config.vocab_size}.",
        "",
        "| N | experts per GPU | weights on rank 0, experts MXFP4 (GiB) | weights on rank 0, experts bf16 (GiB) "
        "| KV cache per 1000 tokens per GPU (MiB) | all_reduce per token per decode step (KiB) | fits 80 GB |",
        "|---|---|---|---|---|---|---|",
    ]
    for n in SIZES:
        first = rank_model(config, True, 0, n)
        packed, dense = weight_bytes(first), weight_bytes(rank_model(config, False, 0, n))
        kv = kv_bytes_per_token(first) * KV_TOKENS
        reduces = all_reduces_per_forward(first) if n > 1 else 0
        comm = reduces * config.hidden_size * ACTIVATION_BYTES
        lines.append(
            f"| {n} | {config.num_experts // n} | {packed / GIB:.1f} | {dense / GIB:.1f} | {kv / 2**20:.1f} "
            f"| {comm / 1024:.1f} ({reduces} x {config.hidden_size} x {ACTIVATION_BYTES} B) "
            f"| {fits(packed, dense, kv)} |"
        )
    unembedding = weight_bytes(rank_model(config, True, 0, 2)) - weight_bytes(rank_model(config, True, 1, 2))
    return lines + ["", f"Ranks other than 0 hold {unembedding / GIB:.2f} GiB less: the unembedding.", ""]


def kv_bytes_per_token(model) -> int:
    """A long sequence's KV per token in the grouped pool the engine builds for windowed layers (bf16)."""
    spec = model.kv_cache_spec()
    return spec.bytes_per_token(torch.bfloat16, grouped=len(spec.group_windows) > 1)


def fits(packed: int, dense: int, kv_per_1000: int) -> str:
    """Which weight mode leaves room in USABLE of an 80 GB GPU, and for how many KV tokens."""
    budget = USABLE * GPU_BYTES
    modes = [(label, budget - size) for label, size in (("MXFP4", packed), ("bf16", dense)) if size < budget]
    if not modes:
        return "no"
    return ", ".join(f"{label}: {room * KV_TOKENS / kv_per_1000 / 1e6:.2f}M KV tokens" for label, room in modes)


def min_tensor_parallel(raw: dict) -> int:
    """The fewest GPUs whose rank 0 holds the weights (experts MXFP4) and SERVING_KV_TOKENS of KV."""
    config = GptOssConfig.from_hf(raw)
    for n in SIZES:
        first = rank_model(config, True, 0, n)
        kv = kv_bytes_per_token(first) * SERVING_KV_TOKENS
        if weight_bytes(first) + kv < USABLE * GPU_BYTES:
            return n
    raise ValueError(f"{SIZES[-1]} GPUs do not hold the model")


def render() -> str:
    lines = [
        "# Scaling gpt-oss over GPUs with --tensor-parallel-size",
        "",
        "Generated by `python -m bench.scaling_table` from the real configs and the modules each rank builds; do "
        "not edit by hand.",
        "",
        "How a rank's share is counted (see docs/distributed.md for the design):",
        "",
        "- Attention is split by heads: q/k/v and sinks column-parallel, the output projection row-parallel. The "
        "KV cache holds this rank's KV heads only, in bf16; the sliding-window layers keep only their window's "
        "blocks, so past the window a token costs the full-attention layers' KV (counted here; the window's "
        "blocks per sequence are not).",
        "- The MoE is expert-parallel: each GPU holds num_experts / N whole experts and the replicated router.",
        "- The embedding is replicated on every GPU; the unembedding only on rank 0, which computes the logits, so "
        "rank 0 is the largest.",
        "- Weights: bf16, norm scales float32, experts either kept MXFP4 (`--keep-experts-packed`, 4.25 bits a value) "
        "or dequantized to bf16 (the default load on GPU).",
        "- Communication per decode step is the payload of the all_reduces, per token in the batch: two per layer "
        "(attention output, MoE output) of hidden x 2 bytes. A ring all_reduce sends 2(N-1)/N times the payload "
        "per GPU. The step's metadata broadcast from rank 0 adds (2 S + G S + T + B) x 4 bytes per step (G KV "
        "groups), not per layer.",
        f"- Fits: weights below {USABLE:.0%} of {GPU_BYTES // 10**9} GB; the cell gives the KV tokens the rest holds.",
        "",
    ]
    for name, raw in MODELS.items():
        lines += model_section(name, raw)
    lines += capacity_plan.render({name: min_tensor_parallel(raw) for name, raw in MODELS.items()})
    return "\n".join(lines)


def main() -> int:
    DOC.write_text(render())
    print(f"wrote {DOC}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
