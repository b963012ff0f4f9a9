"""vLLM's --served-model-name: the one model answers to the names given, the first of them its own."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest

from server.cli import parse_config
from tests.server_process import ServerProcess


@pytest.fixture(scope="module")
def server(tiny_gpt2_dir):
    with ServerProcess(["--model", str(tiny_gpt2_dir), "--served-model-name", "gpt2-small", "gpt2"]) as running:
        yield running


def test_the_first_name_is_the_models_own_and_the_rest_are_aliases(server):
    listed = httpx.get(server.v1 + "/models", timeout=30).json()["data"]
    assert [card["id"] for card in listed] == ["gpt2-small"]
    for name in ("gpt2-small", "gpt2"):
        reply = httpx.post(server.v1 + "/completions", json={"model": name, "prompt": "Hi", "max_tokens": 2},
                           timeout=60)
        assert reply.status_code == 200 and reply.json()["model"] == "gpt2-small"
        assert httpx.get(server.v1 + f"/models/{name}", timeout=30).json()["id"] == "gpt2-small"
    missing = httpx.post(server.v1 + "/completions", json={"model": "tiny", "prompt": "Hi"}, timeout=30)
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "model"
    document = httpx.get(server.base_url + "/openapi.json", timeout=30).json()
    model = document["components"]["schemas"]["CompletionRequest"]["properties"]["model"]
    assert model["enum"] == ["gpt2-small", "gpt2"]
    assert 'model_name="gpt2-small"' in httpx.get(server.base_url + "/metrics", timeout=30).text


def test_the_environment_takes_the_names_comma_separated():
    config = parse_config([], {"GPTSERVE_SERVED_MODEL_NAME": "a, b"})
    assert config.served_model_names == ("a", "b")
    flag_wins = parse_config(["--served-model-name", "c"], {"GPTSERVE_SERVED_MODEL_NAME": "a,b"})
    assert flag_wins.served_model_names == ("c",)


@pytest.mark.parametrize("arguments,message", [
    (["--model", "a={dir}", "--model", "b={dir}", "--served-model-name", "x"], "names the one model served"),
    (["--model", "{dir}", "--served-model-name", "x", "y", "x"], "['x'] given twice"),
    (["--model", "a={dir}", "--model", "a={dir}"], "['a'] given twice"),
], ids=["two-models", "a-name-twice", "two-models-one-name"])
def test_names_that_cannot_be_served_stop_the_server_before_it_loads(tiny_gpt2_dir, arguments, message):
    argv = [argument.format(dir=tiny_gpt2_dir) for argument in arguments]
    done = subprocess.run([sys.executable, "-m", "server", *argv], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and message in done.stderr, done.stderr[-2000:]
