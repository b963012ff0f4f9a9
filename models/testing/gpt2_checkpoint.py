"""Tiny random-weight GPT-2 checkpoints in the HuggingFace on-disk layout, for tests and the offline demo.

Weights are drawn large enough that next-token logits are far from flat, so greedy choices are well
separated and two exact implementations pick the same tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from models.testing.tokenizer_files import write_gpt2_tokenizer

GPT2_VOCAB_SIZE = 50257


def tiny_gpt2_tensors(n_embd: int, n_layer: int, n_positions: int, seed: int) -> dict[str, torch.Tensor]:
    """HF names with the ``transformer.`` prefix; Conv1D weights stored [in, out]."""
    g = torch.Generator().manual_seed(seed)
    normal = lambda *shape, std: torch.randn(*shape, generator=g) * std  # noqa: E731
    tensors = {
        "transformer.wte.weight": normal(GPT2_VOCAB_SIZE, n_embd, std=0.5),
        "transformer.wpe.weight": normal(n_positions, n_embd, std=0.2),
        "transformer.ln_f.weight": 1 + normal(n_embd, std=0.1),
        "transformer.ln_f.bias": normal(n_embd, std=0.1),
    }
    for i in range(n_layer):
        p = f"transformer.h.{i}."
        tensors |= {
            p + "ln_1.weight": 1 + normal(n_embd, std=0.1),
            p + "ln_1.bias": normal(n_embd, std=0.1),
            p + "attn.c_attn.weight": normal(n_embd, 3 * n_embd, std=0.3),
            p + "attn.c_attn.bias": normal(3 * n_embd, std=0.1),
            p + "attn.c_proj.weight": normal(n_embd, n_embd, std=0.2),
            p + "attn.c_proj.bias": normal(n_embd, std=0.1),
            p + "ln_2.weight": 1 + normal(n_embd, std=0.1),
            p + "ln_2.bias": normal(n_embd, std=0.1),
            p + "mlp.c_fc.weight": normal(n_embd, 4 * n_embd, std=0.2),
            p + "mlp.c_fc.bias": normal(4 * n_embd, std=0.1),
            p + "mlp.c_proj.weight": normal(4 * n_embd, n_embd, std=0.1),
            p + "mlp.c_proj.bias": normal(n_embd, std=0.1),
        }
    return tensors


def write_safetensors(out_dir: Path, tensors: dict[str, torch.Tensor], shards: int) -> None:
    """One ``model.safetensors``, or ``shards`` files plus the index json that real sharded exports write."""
    if shards == 1:
        save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})
        return
    names = list(tensors)
    weight_map = {}
    for k in range(shards):
        file = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[k::shards]}
        save_file(part, out_dir / file, metadata={"format": "pt"})
        weight_map |= {n: file for n in part}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def write_tiny_gpt2(
    out_dir: Path,
    *,
    seed: int = 0,
    n_embd: int = 64,
    n_layer: int = 2,
    n_head: int = 4,
    n_positions: int = 128,
    prefix: bool = True,
    lm_head: bool = False,
    shards: int = 1,
    tokenizer_json: bool = False,
) -> Path:
    """Write config.json, weights and GPT-2's real tokenizer files; returns ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = tiny_gpt2_tensors(n_embd, n_layer, n_positions, seed)
    if lm_head:
        tensors["lm_head.weight"] = tensors["transformer.wte.weight"].clone()
    if not prefix:
        tensors = {n.removeprefix("transformer."): t for n, t in tensors.items()}
    write_safetensors(out_dir, tensors, shards)
    config = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": GPT2_VOCAB_SIZE,
        "n_positions": n_positions,
        "n_ctx": n_positions,
        "n_embd": n_embd,
        "n_layer": n_layer,
        "n_head": n_head,
        "n_inner": None,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5,
        "bos_token_id": 50256,
        "eos_token_id": 50256,
        "torch_dtype": "float32",
    }
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    write_gpt2_tokenizer(out_dir, tokenizer_json=tokenizer_json)
    return out_dir
