"""vLLM's --tokenizer: a checkpoint shipped without its tokenizer is served with one from another folder (or a hub
id, tests/test_hub_download.py); the engine core and the front end both read it there."""

from __future__ import annotations

import shutil

import httpx
import pytest
from transformers import GPT2TokenizerFast

from models.tokenizer import TokenizerError
from server.cli import load_models, parse_config
from tests.server_process import ServerProcess

TEXT = "Hello world, a tokenizer kept apart"


@pytest.fixture(scope="module")
def split_checkpoint(tmp_path_factory):
    """A tiny GPT-2 whose tokenizer files were moved out of its folder."""
    from models.testing.gpt2_checkpoint import write_tiny_gpt2

    root = tmp_path_factory.mktemp("split")
    model = write_tiny_gpt2(root / "model")
    tokenizer = root / "tokenizer"
    tokenizer.mkdir()
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.move(model / name, tokenizer / name)
    return model, tokenizer


def test_the_model_loads_with_the_tokenizer_named(split_checkpoint):
    model, tokenizer = split_checkpoint
    with pytest.raises((TokenizerError, OSError)):  # without the flag there is none to load
        load_models(parse_config(["--device", "cpu", "--model", f"tiny={model}"], {}))
    [loaded] = load_models(parse_config(["--device", "cpu", "--model", f"tiny={model}", "--tokenizer",
                                         str(tokenizer)], {})).values()
    assert loaded.tokenizer_dir == tokenizer
    assert loaded.tokenizer.encode(TEXT) == GPT2TokenizerFast.from_pretrained(tokenizer).encode(TEXT)


def test_the_server_serves_it(split_checkpoint):
    model, tokenizer = split_checkpoint
    with ServerProcess(["--model", f"tiny={model}", "--tokenizer", str(tokenizer)]) as server:
        tokens = httpx.post(server.base_url + "/tokenize", json={"prompt": TEXT}, timeout=30).json()["tokens"]
        reply = httpx.post(server.v1 + "/completions", timeout=60,
                           json={"model": "tiny", "prompt": TEXT, "max_tokens": 2, "ignore_eos": True})
    assert tokens == GPT2TokenizerFast.from_pretrained(tokenizer).encode(TEXT)
    assert reply.status_code == 200 and reply.json()["usage"]["prompt_tokens"] == len(tokens)


def test_a_folder_without_tokenizer_files_or_several_models_are_refused(split_checkpoint, tmp_path):
    model, _ = split_checkpoint
    with pytest.raises(ValueError, match="holds neither tokenizer.json nor vocab.json"):
        load_models(parse_config(["--model", f"tiny={model}", "--tokenizer", str(tmp_path)], {}))
    with pytest.raises(ValueError, match="does not exist"):
        load_models(parse_config(["--model", f"tiny={model}", "--tokenizer", str(tmp_path / "absent")], {}))
    with pytest.raises(ValueError, match="one model's tokenizer"):
        load_models(parse_config(["--model", f"a={model}", "--model", f"b={model}", "--tokenizer", str(model)], {}))
