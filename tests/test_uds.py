"""vLLM's --uds: the server listens on a Unix domain socket instead of a TCP port; the OpenAI SDK and the
container's readiness probe reach it there, and the socket is gone once the server has stopped."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from bench.server_process import PROJECT_ROOT, free_port
from server.healthcheck import probe


@pytest.fixture(scope="module")
def socket_server(tiny_gpt2_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("uds") / "gptserve.sock"
    port = free_port()  # given, and left alone: the socket replaces it
    log = path.with_suffix(".log").open("w")
    process = subprocess.Popen([sys.executable, "-m", "server", "--device", "cpu", "--model", f"tiny={tiny_gpt2_dir}",
                                "--uds", str(path), "--port", str(port)], cwd=PROJECT_ROOT, stdout=log, stderr=log)
    client = httpx.Client(transport=httpx.HTTPTransport(uds=str(path)), base_url="http://gptserve", timeout=60)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if client.get("/health").status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.2)
    else:
        process.kill()
        raise AssertionError(path.with_suffix(".log").read_text()[-3000:])
    yield process, path, port, client
    if process.poll() is None:
        process.kill()
        process.wait()
    client.close()
    log.close()


def test_the_api_answers_on_the_socket_and_not_on_the_port(socket_server):
    _, _, port, client = socket_server
    sdk = openai.OpenAI(base_url="http://gptserve/v1", api_key="unused", http_client=client, max_retries=0)
    completion = sdk.completions.create(model="tiny", prompt="Hello", max_tokens=3, extra_body={"ignore_eos": True})
    assert completion.usage.completion_tokens == 3
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)


def test_the_readiness_probe_asks_on_the_socket(socket_server, tmp_path):
    _, path, _, _ = socket_server
    assert probe({"GPTSERVE_UDS": str(path)}) == 0
    assert probe({"GPTSERVE_UDS": str(tmp_path / "absent.sock")}) == 1


def test_the_socket_is_removed_when_the_server_stops(socket_server):
    process, path, _, _ = socket_server
    assert path.is_socket()
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0
    assert not Path(path).exists()
