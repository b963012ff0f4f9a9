"""The two offline commands users run without a server: make-tiny writes every layout, generate reads any of them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from models.generation import greedy_generate
from models.loader import load_model

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def run_module(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, check=True, cwd=PROJECT_ROOT)


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("make-tiny")
    run_module("models.testing", "make-tiny", str(out))
    return out


def test_make_tiny_writes_gpt2_and_both_gpt_oss_layouts(tiny_root):
    assert (tiny_root / "gpt2" / "config.json").is_file()
    assert (tiny_root / "gpt2" / "vocab.json").is_file()
    assert (tiny_root / "gpt-oss" / "model.safetensors.index.json").is_file()
    assert (tiny_root / "gpt-oss" / "tokenizer.json").is_file()
    assert (tiny_root / "gpt-oss" / "original" / "model.safetensors").is_file()
    assert {load_model(tiny_root / d, device="cpu").family for d in ("gpt2", "gpt-oss", "gpt-oss/original")} == {
        "gpt2", "gpt_oss"
    }


@pytest.mark.parametrize("layout", ["gpt-oss", "gpt-oss/original"])
def test_generate_cli_reads_either_gpt_oss_layout(tiny_root, layout):
    loaded = load_model(tiny_root / layout, device="cpu")
    prompt = "The harmony format"
    tokenizer = loaded.tokenizer
    [tokens] = greedy_generate(loaded.model, [tokenizer.encode(prompt)], 8, frozenset({tokenizer.eos_token_id}),
                               vocab_size=tokenizer.vocab_size)
    result = run_module("models.generate", "--model", str(tiny_root / layout), "--max-tokens", "8", "--prompt", prompt,
                        "--device", "cpu")
    assert result.stdout == loaded.tokenizer.decode(tokens)


def test_generate_cli_stops_at_the_generation_configs_end_tokens(tiny_root, tmp_path):
    """From an ``original/`` folder too, whose generation config is its parent's (as the real repository keeps it)."""
    import json
    import shutil

    copy = tmp_path / "gpt-oss"
    shutil.copytree(tiny_root / "gpt-oss", copy)
    loaded = load_model(copy / "original", device="cpu")
    tokenizer = loaded.tokenizer
    prompt = "The harmony format"
    [tokens] = greedy_generate(loaded.model, [tokenizer.encode(prompt)], 8, frozenset({tokenizer.eos_token_id}),
                               vocab_size=tokenizer.vocab_size)
    assert len(tokens) == 8 and tokens[3] not in tokens[:3]
    generation = json.loads((copy / "generation_config.json").read_text())
    (copy / "generation_config.json").write_text(json.dumps({**generation, "eos_token_id": [tokens[3]]}))
    result = run_module("models.generate", "--model", str(copy / "original"), "--max-tokens", "8", "--prompt", prompt,
                        "--device", "cpu")
    assert result.stdout == tokenizer.decode(tokens[:3])
