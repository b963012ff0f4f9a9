"""GPT-2 against transformers' GPT2LMHeadModel on tiny random checkpoints in the real HF layout (fp32)."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from models.checkpoint import CheckpointError
from models.forward_batch import ForwardBatch
from models.generation import greedy_generate, prompt_logits
from models.gpt2 import load_gpt2
from models.kv_cache import PagedKVCache
from models.loader import load_model
from models.onednn_linear import OneDNNLinear
from models.testing.gpt2_checkpoint import write_tiny_gpt2
from tests.linear_paths import PATHS, on_path, on_same_path

ATOL = 1e-4


@pytest.fixture(scope="module", params=PATHS)
def model(request: pytest.FixtureRequest, tiny_gpt2_dir: Path, device: torch.device):
    """Every oracle test runs on each linear path (tests/linear_paths.py)."""
    return on_path(load_gpt2(tiny_gpt2_dir, torch.float32, device), request.param, device)


@pytest.fixture(scope="module")
def oracle(tiny_gpt2_dir: Path, device: torch.device):
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir, attn_implementation="eager", dtype=torch.float32)
    return hf.to(device).eval()


def random_ids(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(50257) for _ in range(n)]


def oracle_logits(oracle, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return oracle(torch.tensor([ids], device=oracle.device)).logits[0].float()


def test_full_sequence_logits_match_transformers(model, oracle):
    ids = random_ids(100, seed=1)
    expected = oracle_logits(oracle, ids)
    [ours] = prompt_logits(model, [ids])
    assert expected.std() > 1.0, "test weights must give well-separated logits"
    assert (ours - expected).abs().max().item() <= ATOL


def test_paged_decode_matches_full_forward_for_mixed_batch(model, oracle, device):
    """Three sequences: two prefill in chunks while the third decodes, then 30 decode steps, shuffled blocks."""
    block_size = 8
    prompts = [random_ids(n, seed=10 + n) for n in (5, 21, 40)]
    full = [p + random_ids(31, seed=i) for i, p in enumerate(prompts)]
    blocks = list(range(40))
    random.Random(3).shuffle(blocks)
    tables = [blocks[0:10], blocks[10:20], blocks[20:30]]
    cache = PagedKVCache(model.kv_cache_spec(), 40, block_size, device=device)
    expected = [oracle_logits(oracle, seq) for seq in full]

    def step(tokens: list[list[int]], starts: list[int], rows: list[int]) -> list[torch.Tensor]:
        batch = ForwardBatch.build(tokens, starts, [tables[r] for r in rows], block_size, device)
        with torch.inference_mode():
            logits = model.compute_logits(model(batch, cache))
        return list(logits.split(batch.query_lens))

    # seq 0 prefills whole; seq 1 and 2 prefill their first chunk
    out = step([full[0][:5], full[1][:13], full[2][:17]], [0, 0, 0], [0, 1, 2])
    for r, (got, n) in enumerate(zip(out, (5, 13, 17))):
        assert (got - expected[r][:n]).abs().max() <= ATOL
    # seq 0 decodes while seq 1 and 2 finish prefill in the same call
    out = step([full[0][5:6], full[1][13:21], full[2][17:40]], [5, 13, 17], [0, 1, 2])
    assert (out[0] - expected[0][5:6]).abs().max() <= ATOL
    assert (out[1] - expected[1][13:21]).abs().max() <= ATOL
    assert (out[2] - expected[2][17:40]).abs().max() <= ATOL
    positions = [6, 21, 40]
    for _ in range(30):
        tokens = [[full[r][positions[r]]] for r in range(3)]
        out = step(tokens, positions, [0, 1, 2])
        for r in range(3):
            assert (out[r][0] - expected[r][positions[r]]).abs().max() <= ATOL
        positions = [p + 1 for p in positions]


def test_greedy_generation_is_token_identical_to_transformers(model, oracle, device):
    prompts = [random_ids(n, seed=n) for n in (3, 17)]
    ours = greedy_generate(model, prompts, max_new_tokens=40)
    for prompt, got in zip(prompts, ours):
        ids = torch.tensor([prompt], device=device)
        reference = oracle.generate(ids, max_new_tokens=40, min_new_tokens=40, do_sample=False, pad_token_id=50256)
        assert got == reference[0, len(prompt):].tolist()


@pytest.mark.parametrize("variant", [{"prefix": False}, {"lm_head": True}, {"shards": 1, "tokenizer_json": True}])
def test_export_variants_load_to_identical_logits(tmp_path, model, variant):
    other = load_gpt2(write_tiny_gpt2(tmp_path / "v", **variant), torch.float32, model.wte.weight.device)
    other = on_same_path(other, model)
    ids = random_ids(20, seed=5)
    assert torch.equal(prompt_logits(other, [ids])[0], prompt_logits(model, [ids])[0])


def test_bfloat16_load_stays_close_to_float32(tiny_gpt2_dir, model, device):
    half = load_gpt2(tiny_gpt2_dir, torch.bfloat16, device)
    assert half.wte.weight.dtype == torch.bfloat16
    ids = random_ids(12, seed=6)
    ours, ref = prompt_logits(half, [ids])[0], prompt_logits(model, [ids])[0]
    assert (ours.argmax(-1) == ref.argmax(-1)).float().mean() > 0.8


def test_missing_weights_file_is_named(tmp_path):
    config = {"model_type": "gpt2", "n_embd": 8, "n_head": 2, "n_layer": 1, "n_positions": 8, "vocab_size": 50257}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_gpt2(tmp_path, torch.float32, "cpu")


def test_missing_config_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="config.json"):
        load_model(tmp_path)


def test_unknown_model_type_is_rejected(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match="unknown model_type 'llama'"):
        load_model(tmp_path)


def test_wrong_tensor_shape_names_the_tensor(tmp_path):
    directory = write_tiny_gpt2(tmp_path / "bad")
    tensors = load_file(directory / "model.safetensors")
    tensors["transformer.h.1.mlp.c_fc.weight"] = tensors["transformer.h.1.mlp.c_fc.weight"][:, :10].contiguous()
    save_file(tensors, directory / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"transformer\.h\.1\.mlp\.c_fc\.weight has shape \[64, 10\]"):
        load_gpt2(directory, torch.float32, "cpu")


@pytest.mark.parametrize("key,value", [("n_layer", 0), ("n_head", -1), ("n_embd", "big"), ("layer_norm_epsilon", 5.0)])
def test_config_value_out_of_range_is_named(tmp_path, key, value):
    directory = write_tiny_gpt2(tmp_path / "cfg")
    config = json.loads((directory / "config.json").read_text())
    config[key] = value
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=f"{key}="):
        load_gpt2(directory, torch.float32, "cpu")


def test_generate_cli_prints_exactly_the_greedy_continuation(tiny_gpt2_dir, model):
    loaded = load_model(tiny_gpt2_dir, device="cpu")
    prompt = "Hello, my name is"
    expected = loaded.tokenizer.decode(
        greedy_generate(loaded.model, [loaded.tokenizer.encode(prompt)], 12, frozenset({50256}))[0]
    )
    result = subprocess.run(
        [sys.executable, "-m", "models.generate", "--model", str(tiny_gpt2_dir), "--max-tokens", "12",
         "--prompt", prompt, "--device", "cpu"],
        capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[1],
    )
    assert result.stdout == expected
    assert "loaded" in result.stderr


def test_float32_cpu_load_serves_through_onednn(tiny_gpt2_dir):
    """bf16 loads: tests/test_cpu_bf16_compute.py (oneDNN only where the CPU has bf16 dot products)."""
    served = load_model(tiny_gpt2_dir, dtype="float32", device="cpu").model
    assert isinstance(served.lm_head, OneDNNLinear) and isinstance(served.h[0].mlp.c_fc, OneDNNLinear)
