"""Shared fixtures: tiny checkpoints written once per session, and the device the suite runs on."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--device", default="cpu", help="device for model tests: cpu (default) or cuda")


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
