"""Tiny random-weight GPT-2 checkpoints in the HuggingFace on-disk layout, in every variant the loader accepts.

The weights and config are the offline demo model's (models/demo_checkpoint.py), in any shape.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from models.demo_checkpoint import GPT2_VOCAB_SIZE, gpt2_config, tiny_gpt2_tensors
from models.testing.tokenizer_files import write_gpt2_tokenizer

__all__ = ["GPT2_VOCAB_SIZE", "tiny_gpt2_tensors", "write_safetensors", "write_tiny_gpt2"]


def write_safetensors(out_dir: Path, tensors: dict[str, torch.Tensor], shards: int) -> None:
    """One ``model.safetensors``, or ``shards`` files plus the index json that real sharded exports write."""
    if shards == 1:
        save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})
        return
    names = list(tensors)
    weight_map: dict[str, str] = {}
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
    config = gpt2_config(n_embd, n_layer, n_head, n_positions)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    write_gpt2_tokenizer(out_dir, tokenizer_json=tokenizer_json)
    return out_dir
