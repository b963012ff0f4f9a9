"""The engine core's tokenizer builds its tables only when first used (models/deferred_tokenizer.py): the front
end holds the same tokenizer, and o200k's tables cost the core ~120 MB of resident memory."""

from __future__ import annotations

from pathlib import Path

import pytest

from models.deferred_tokenizer import DeferredTokenizer
from models.testing.gpt_oss_checkpoint import write_tiny_gpt_oss
from models.testing.tokenizer_files import write_gpt2_tokenizer, write_gpt_oss_tokenizer
from models.tokenizer import load_tokenizer
from server.config import ServerConfig
from server.engine.core_process import load_served_model

TEXT = "Hello <|endoftext|> wörld"


@pytest.mark.parametrize("files", ["gpt2-vocab", "gpt2-json", "o200k"])
def test_deferred_tokenizer_knows_its_size_at_once_and_builds_the_same_tokenizer_on_first_use(
    tmp_path: Path, files: str
) -> None:
    if files == "o200k":
        write_gpt_oss_tokenizer(tmp_path)
    else:
        write_gpt2_tokenizer(tmp_path, tokenizer_json=files == "gpt2-json")
    eager, deferred = load_tokenizer(tmp_path), DeferredTokenizer(tmp_path)
    assert deferred.vocab_size == eager.vocab_size
    assert "_encoding" not in vars(deferred)
    assert deferred.encode(TEXT) == eager.encode(TEXT)
    assert deferred.special_tokens == eager.special_tokens and deferred.eos_token_id == eager.eos_token_id
    assert deferred.token_bytes(300) == eager.token_bytes(300)


def test_the_engine_core_loads_its_model_without_building_the_tokenizer(tmp_path: Path) -> None:
    directory = write_tiny_gpt_oss(tmp_path)
    loaded = load_served_model(directory, ServerConfig(models=(str(directory),)))
    assert "_encoding" not in vars(loaded.tokenizer)
    assert loaded.tokenizer.vocab_size == load_tokenizer(directory).vocab_size
