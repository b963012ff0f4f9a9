"""``python -m bench.make_gpt2_checkpoint OUT [--shape 124m]``: a random GPT-2 checkpoint of a real model's shape.

The benchmark workload of BASELINES.md: GPT-2-124M's shape (transformers' ``GPT2Config()`` defaults) with
seeded random weights, written as ``save_pretrained`` would (``transformer.``-prefixed safetensors, tied
LM head omitted, config.json) plus GPT-2's real tokenizer files, so any engine that reads the HF layout
(ours, llama.cpp's converter, transformers) serves exactly the same model.

Weights follow GPT-2's initialisation without importing transformers: normal(0, 0.02) matrices and
embeddings, residual projections scaled by 1/sqrt(2 * n_layer), zero biases, unit LayerNorm scales.
The next-token distribution is therefore nearly flat: fine for timing, useless for comparing greedy text.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from models.testing.gpt2_checkpoint import GPT2_VOCAB_SIZE, write_safetensors
from models.testing.tokenizer_files import write_gpt2_tokenizer

INIT_STD = 0.02


@dataclass(frozen=True, slots=True)
class Gpt2Shape:
    n_layer: int
    n_embd: int
    n_head: int
    n_positions: int = 1024


# The four sizes OpenAI released; "124m" is GPT2Config()'s defaults.
SHAPES = {
    "124m": Gpt2Shape(12, 768, 12),
    "355m": Gpt2Shape(24, 1024, 16),
    "774m": Gpt2Shape(36, 1280, 20),
    "1558m": Gpt2Shape(48, 1600, 25),
}


def gpt2_tensors(shape: Gpt2Shape, seed: int) -> dict[str, torch.Tensor]:
    """Float32 weights under HF's names; Conv1D matrices are stored [in, out]."""
    g = torch.Generator().manual_seed(seed)
    d, residual_std = shape.n_embd, INIT_STD / math.sqrt(2 * shape.n_layer)

    def normal(*size: int, std: float = INIT_STD) -> torch.Tensor:
        return torch.randn(*size, generator=g) * std

    tensors = {
        "transformer.wte.weight": normal(GPT2_VOCAB_SIZE, d),
        "transformer.wpe.weight": normal(shape.n_positions, d),
        "transformer.ln_f.weight": torch.ones(d),
        "transformer.ln_f.bias": torch.zeros(d),
    }
    for i in range(shape.n_layer):
        p = f"transformer.h.{i}."
        tensors |= {
            p + "ln_1.weight": torch.ones(d),
            p + "ln_1.bias": torch.zeros(d),
            p + "attn.c_attn.weight": normal(d, 3 * d),
            p + "attn.c_attn.bias": torch.zeros(3 * d),
            p + "attn.c_proj.weight": normal(d, d, std=residual_std),
            p + "attn.c_proj.bias": torch.zeros(d),
            p + "ln_2.weight": torch.ones(d),
            p + "ln_2.bias": torch.zeros(d),
            p + "mlp.c_fc.weight": normal(d, 4 * d),
            p + "mlp.c_fc.bias": torch.zeros(4 * d),
            p + "mlp.c_proj.weight": normal(4 * d, d, std=residual_std),
            p + "mlp.c_proj.bias": torch.zeros(d),
        }
    return tensors


def config_json(shape: Gpt2Shape) -> dict:
    """The keys and values GPT2Config().to_dict() has, at ``shape``'s sizes."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": GPT2_VOCAB_SIZE,
        "n_positions": shape.n_positions,
        "n_ctx": shape.n_positions,  # llama.cpp's converter reads n_ctx
        "n_embd": shape.n_embd,
        "n_layer": shape.n_layer,
        "n_head": shape.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",
        "resid_pdrop": 0.1,
        "embd_pdrop": 0.1,
        "attn_pdrop": 0.1,
        "layer_norm_epsilon": 1e-5,
        "initializer_range": INIT_STD,
        "scale_attn_weights": True,
        "use_cache": True,
        "bos_token_id": 50256,
        "eos_token_id": 50256,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
    }


def write_gpt2_checkpoint(out_dir: Path, shape: str = "124m", seed: int = 0) -> Path:
    """Write config.json, model.safetensors and GPT-2's tokenizer files into ``out_dir``; returns it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    sizes = SHAPES[shape]
    write_safetensors(out_dir, gpt2_tensors(sizes, seed), shards=1)
    (out_dir / "config.json").write_text(json.dumps(config_json(sizes), indent=2))
    write_gpt2_tokenizer(out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.make_gpt2_checkpoint", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="directory to write (created if absent)")
    parser.add_argument("--shape", choices=SHAPES, default="124m", help="which GPT-2 size to imitate")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    write_gpt2_checkpoint(args.out, args.shape, args.seed)
    print(f"wrote a random GPT-2-{args.shape} checkpoint to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
