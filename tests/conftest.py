"""Shared fixtures: tiny checkpoints written once per session, and the device the suite runs on."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--device", default="cpu", help="device for model tests: cpu (default) or cuda")


def pytest_configure(config: pytest.Config) -> None:
    """Without a GPU, Triton kernels (the CUDA attention path) run under Triton's interpreter. Triton reads the
    setting when it first defines its own functions, so it is set before anything imports it."""
    if config.getoption("--device") == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session", autouse=True)
def float32_servers() -> None:
    """Servers the tests start compute in float32 unless a test names a dtype: the suite compares them with
    transformers in float32, and ``--dtype auto`` picks bfloat16 on a CPU with AMX-BF16 or AVX512-BF16
    (models/cpu_isa.py)."""
    os.environ.setdefault("GPTSERVE_DTYPE", "float32")


@pytest.fixture(scope="session")
def device(request: pytest.FixtureRequest) -> torch.device:
    name = request.config.getoption("--device")
    if name == "cuda" and not torch.cuda.is_available():
        pytest.fail("--device cuda given but no CUDA device is available")
    return torch.device(name)


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from models.testing.gpt2_checkpoint import write_tiny_gpt2

    return write_tiny_gpt2(tmp_path_factory.mktemp("tiny") / "gpt2", shards=2)


@pytest.fixture(scope="session")
def gpt2_tokenizer(tiny_gpt2_dir: Path):
    """tiny_gpt2_dir's tokenizer, as the server loads it."""
    from models.tokenizer import load_tokenizer

    return load_tokenizer(tiny_gpt2_dir)


@pytest.fixture(scope="session")
def gpt2_oracle(tiny_gpt2_dir: Path):
    """transformers' GPT-2 on tiny_gpt2_dir's weights (float32, CPU): what the server's answers are held to."""
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir).eval()
