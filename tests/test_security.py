"""Security: the API key guards every route but the probes, hostile bodies are refused before they reach the
engine (no KV block is ever taken), the server listens on loopback by default, and prompts stay out of the log
unless --log-requests asks for them.
"""

from __future__ import annotations

import time

import httpx
import pytest

from server.cli import parse_config
from tests.server_process import ServerProcess

KEY = "s3cret-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
SECRET_PROMPT = "my-secret-prompt-4f1c9a"
JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def server(tiny_gpt2_dir):
    # a KV cache of 2,048 tokens: 64 choices running at once of 101 tokens each (n x max_tokens below) never fit
    args = ["--model", f"tiny={tiny_gpt2_dir}", "--api-key", KEY, "--metrics-require-key", "--max-body-bytes",
            "65536", "--kv-cache-tokens", "2048"]
    with ServerProcess(args) as running:
        yield running


def kv_blocks_used(server: ServerProcess) -> int:
    return server.health()["models"]["tiny"]["kv_blocks_used"]


def test_every_route_but_the_probes_demands_the_key(server):
    document = httpx.get(server.base_url + "/openapi.json", headers=AUTH, timeout=10).json()
    routes = [(method.upper(), path.replace("{model_id}", "tiny")) for path, operations in document["paths"].items()
              for method in operations]
    routes += [("GET", "/openapi.json"), ("GET", "/docs"), ("GET", "/nowhere")]
    assert ("GET", "/metrics") in routes
    for method, path in routes:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Bearer {KEY}x"},
                        {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"}):
            response = httpx.request(method, server.base_url + path, headers=headers, timeout=10)
            if path in ("/health", "/ready", "/ping", "/version"):  # probes (SageMaker's too), and /version as vLLM
                assert response.status_code == 200, (method, path)
            else:
                assert response.status_code == 401, (method, path, headers)
                assert response.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server.base_url + "/metrics", headers=AUTH, timeout=10).status_code == 200


def test_any_of_several_api_keys_lets_a_request_in(capsys):
    from fastapi.testclient import TestClient

    from server.app import create_app
    from server.config import ServerConfig

    config = parse_config(["--api-key", "old-key", "new-key"], {})
    assert config.http.api_keys == ("old-key", "new-key")
    assert parse_config([], {"GPTSERVE_API_KEY": "old-key,new-key"}).http.api_keys == ("old-key", "new-key")
    client = TestClient(create_app(ServerConfig(http=config.http), {}))
    for key, status in (("old-key", 200), ("new-key", 200), ("new-keyx", 401), ("old-key new-key", 401)):
        assert client.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == status, key
    for bad in ("", " spaced key"):  # an empty key would leave the API open
        with pytest.raises(SystemExit):
            parse_config(["--api-key", bad], {})
        assert "--api-key" in capsys.readouterr().err


def test_metrics_stay_open_without_metrics_require_key():
    assert parse_config(["--api-key", KEY]).http.metrics_require_key is False
    assert parse_config(["--api-key", KEY, "--metrics-require-key"]).http.metrics_require_key is True


@pytest.mark.parametrize(("name", "body", "status"), [
    ("oversized body", b'{"model": "tiny", "prompt": "' + b"x" * 70000 + b'"}', 413),
    ("prompt over the context", b'{"model": "tiny", "prompt": "' + b"hello " * 2000 + b'"}', 400),
    ("token prompt over the context", b'{"model": "tiny", "prompt": [' + b"11," * 500 + b"11]}", 400),
    ("huge n", b'{"model": "tiny", "prompt": "x", "n": 100000000}', 400),
    ("huge max_tokens", b'{"model": "tiny", "prompt": "x", "max_tokens": 1000000000000}', 400),
    ("huge logprobs", b'{"model": "tiny", "prompt": "x", "logprobs": 1000000}', 400),
    ("huge integer literal", b'{"model": "tiny", "prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}", 400),
    ("deeply nested arrays", b'{"model": "tiny", "prompt": ' + b"[" * 20000 + b"]" * 20000 + b"}", 400),
    ("deeply nested objects", b'{"model": "tiny", "prompt": "x", "logit_bias": ' + b'{"a": ' * 8000 + b"1"
     + b"}" * 8000 + b"}", 400),
    ("invalid UTF-8 in a string", b'{"model": "tiny", "prompt": "\xff\xfe caf\xc3"}', 400),
    ("invalid UTF-8 in a key", b'{"model\xc3": "tiny", "prompt": "x"}', 400),
    ("NaN temperature", b'{"model": "tiny", "prompt": "x", "temperature": NaN}', 400),
    ("n x max_tokens beyond the KV cache", b'{"model": "tiny", "prompt": "x", "n": 128, "max_tokens": 100}', 400),
    ("echo amplification", b'{"model": "tiny", "prompt": [' + b"11," * 119 + b'11], "echo": true, "logprobs": 20, '
     b'"n": 128, "max_tokens": 1}', 400),
    ("chat with a huge message", b'{"model": "tiny", "messages": [{"role": "user", "content": "'
     + b"hi " * 5000 + b'"}]}', 400),
])
def test_hostile_bodies_get_4xx_without_allocating_kv(server, name, body, status):
    path = "/v1/chat/completions" if b"messages" in body else "/v1/completions"
    response = httpx.post(server.base_url + path, content=body, headers=AUTH | JSON, timeout=30)
    assert response.status_code == status, (name, response.text[:300])
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert kv_blocks_used(server) == 0
    assert server.health()["models"]["tiny"]["waiting"] == 0


def test_server_listens_on_loopback_by_default():
    assert parse_config([]).http.host == "127.0.0.1"


def test_prompts_and_outputs_stay_out_of_the_log(server):
    ids = []
    for path, body in [("/v1/completions", {"model": "tiny", "prompt": SECRET_PROMPT, "max_tokens": 2}),
                       ("/v1/chat/completions", {"model": "tiny", "max_tokens": 2,
                                                 "messages": [{"role": "user", "content": SECRET_PROMPT}]}),
                       ("/v1/perplexity", {"model": "tiny", "input": SECRET_PROMPT}),
                       ("/v1/completions", {"model": "tiny", "prompt": SECRET_PROMPT, "max_tokens": 9999}),
                       ("/v1/completions", {"model": "tiny", "prompt": SECRET_PROMPT, "bogus": SECRET_PROMPT})]:
        headers = AUTH | {"x-request-id": f"quiet-{len(ids)}"}
        response = httpx.post(server.base_url + path, json=body, headers=headers, timeout=30)
        assert response.status_code in (200, 400)
        ids.append(headers["x-request-id"])
    deadline = time.monotonic() + 10  # the access line is written once the response is out
    while not all(i in server.log_text() for i in ids) and time.monotonic() < deadline:
        time.sleep(0.05)
    log = server.log_text()
    assert all(i in log for i in ids)  # the requests were logged...
    assert SECRET_PROMPT not in log  # ...without what they said


def test_log_requests_puts_the_prompt_in_the_log(tiny_gpt2_dir):
    with ServerProcess(["--model", f"tiny={tiny_gpt2_dir}", "--log-requests"]) as server:
        body = {"model": "tiny", "prompt": SECRET_PROMPT, "max_tokens": 2}
        assert httpx.post(server.v1 + "/completions", json=body, timeout=30).status_code == 200
        deadline = time.monotonic() + 10  # the access line is written once the response is out
        while SECRET_PROMPT not in server.log_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert SECRET_PROMPT in server.log_text()
