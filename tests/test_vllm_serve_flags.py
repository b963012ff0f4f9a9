"""vLLM serve's command line: the model as its positional argument, --root-path behind a proxy, the request log's
flags (--enable-log-requests, --disable-log-requests, --max-log-len), --disable-fastapi-docs,
--enable-force-include-usage, --enable-server-load-tracking (GET /load), and the access log's flags
(--disable-uvicorn-access-log, --disable-access-log-for-endpoints, --uvicorn-log-level)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time

import httpx
import pytest

from bench.server_process import PROJECT_ROOT
from server.cli import parse_config
from server.routes.load import counts_as_load
from tests.server_process import ServerProcess

KEY = {"Authorization": "Bearer sesame"}
BODY = {"model": "tiny", "prompt": "A secret prompt", "max_tokens": 2}


@pytest.fixture(scope="module")
def proxied(tmp_path_factory):
    from models.testing.gpt2_checkpoint import write_tiny_gpt2

    model = write_tiny_gpt2(tmp_path_factory.mktemp("long") / "gpt2", n_positions=4096)  # streams long enough to watch
    args = [f"tiny={model}", "--root-path", "/llm/", "--api-key", "sesame", "--enable-log-requests",
            "--max-log-len", "24", "--enable-server-load-tracking", "--enable-log-outputs",
            "--middleware", "tests.sample_middleware.StampHeader", "--middleware", "tests.sample_middleware.stamp"]
    with ServerProcess(args) as running:
        yield running


@pytest.fixture(scope="module")
def undocumented(tiny_gpt2_dir):
    args = [f"tiny={tiny_gpt2_dir}", "--disable-fastapi-docs", "--disable-log-requests", "--enable-force-include-usage",
            "--disable-access-log-for-endpoints", "/health,/v1/models", "--uvicorn-log-level", "warning"]
    with ServerProcess(args, env={"GPTSERVE_LOG_REQUESTS": "1"}) as running:
        yield running


def logged_bodies(server: ServerProcess) -> list[str]:
    lines = [json.loads(line) for line in server.log_text().splitlines() if line.startswith("{")]
    return [line["body"] for line in lines if line.get("msg") == "request" and "body" in line]


def test_the_positional_model_is_served(proxied):
    models = httpx.get(proxied.v1 + "/models", headers=KEY, timeout=10).json()["data"]
    assert [model["id"] for model in models] == ["tiny"]


@pytest.mark.parametrize("prefix", ["", "/llm"])
def test_requests_are_served_with_the_root_path_or_with_it_stripped(proxied, prefix):
    base = proxied.base_url + prefix
    assert httpx.post(base + "/v1/completions", json=BODY, headers=KEY, timeout=60).status_code == 200
    assert httpx.post(base + "/v1/completions", json=BODY, timeout=60).status_code == 401
    for open_path in ("/health", "/metrics", "/ping"):  # open to probes and scrapers under the prefix too
        assert httpx.get(base + open_path, timeout=10).status_code == 200, open_path


def test_the_docs_and_the_openapi_document_name_the_root_path(proxied):
    document = httpx.get(proxied.base_url + "/openapi.json", headers=KEY, timeout=10).json()
    assert document["servers"] == [{"url": "/llm"}]
    assert "/llm/openapi.json" in httpx.get(proxied.base_url + "/docs", headers=KEY, timeout=10).text


def test_the_request_log_keeps_max_log_len_bytes_of_each_body(proxied):
    httpx.post(proxied.v1 + "/completions", json=BODY, headers=KEY, timeout=60)
    bodies = logged_bodies(proxied)
    assert bodies and all(len(body) <= 24 for body in bodies)
    assert json.dumps(BODY, separators=(",", ":"))[:24] in bodies  # as httpx writes it


def request_line(server: ServerProcess, request_id: str, timeout: float = 10.0) -> dict:
    """The request's log line, written once its answer's last byte is out."""
    deadline = time.monotonic() + timeout
    while True:
        for raw in server.log_text().splitlines():
            line = json.loads(raw) if raw.startswith("{") else {}
            if line.get("msg") == "request" and line.get("request_id") == request_id:
                return line
        assert time.monotonic() < deadline, f"no request line for {request_id}"
        time.sleep(0.05)


def test_log_outputs_writes_each_choice_cut_at_max_log_len(proxied):
    """Chat and completions, whole and streamed, and Responses: the text the client got (its first 24
    characters), the tokens it came from (24 of 30) and why it ended."""
    long = {"model": "tiny", "max_tokens": 30, "ignore_eos": True}
    reply = httpx.post(proxied.v1 + "/completions", json={**long, "prompt": "Once", "n": 2}, headers=KEY, timeout=60)
    outputs = request_line(proxied, reply.headers["x-request-id"])["outputs"]
    assert [output["text"] for output in outputs] == [choice["text"][:24] for choice in reply.json()["choices"]]
    assert [(len(output["token_ids"]), output["finish_reason"]) for output in outputs] == [(24, "length")] * 2

    chat = {**long, "messages": [{"role": "user", "content": "Hi"}]}
    reply = httpx.post(proxied.v1 + "/chat/completions", json=chat, headers=KEY, timeout=60)
    [output] = request_line(proxied, reply.headers["x-request-id"])["outputs"]
    content = reply.json()["choices"][0]["message"]["content"]
    assert output == {"content": content[:24], "reasoning": "", "tool_calls": [], "token_ids": output["token_ids"],
                      "finish_reason": "length"} and len(output["token_ids"]) == 24

    with httpx.stream("POST", proxied.v1 + "/completions", json={**long, "prompt": "Once", "stream": True},
                      headers=KEY, timeout=60) as streamed:
        chunks = [json.loads(line[6:]) for line in streamed.iter_lines() if line.startswith("data: {")]
    [output] = request_line(proxied, streamed.headers["x-request-id"])["outputs"]
    assert output["text"] == "".join(chunk["choices"][0]["text"] for chunk in chunks)[:24]

    reply = httpx.post(proxied.v1 + "/responses", json={"model": "tiny", "input": "Hi", "max_output_tokens": 5},
                       headers=KEY, timeout=60)
    line = request_line(proxied, reply.headers["x-request-id"])
    [output] = line["outputs"]
    assert output["content"] == reply.json()["output"][0]["content"][0]["text"][:24]
    assert (line["prompt_tokens"], line["completion_tokens"]) == (reply.json()["usage"]["input_tokens"],
                                                                  reply.json()["usage"]["output_tokens"])


def test_outputs_stay_out_of_the_log_unless_asked_for(undocumented):
    reply = httpx.post(undocumented.v1 + "/completions", json=BODY, timeout=60)
    assert "outputs" not in request_line(undocumented, reply.headers["x-request-id"])


def test_middleware_sees_every_request_the_gateway_lets_in(proxied):
    models = httpx.get(proxied.v1 + "/models", headers=KEY, timeout=10)
    assert (models.headers["x-stamp-class"], models.headers["x-stamp-function"]) == ("/v1/models", "seen")
    with httpx.stream("POST", proxied.v1 + "/completions", headers=KEY, timeout=60,
                      json={**BODY, "max_tokens": 5, "ignore_eos": True, "stream": True}) as streamed:
        events = [line for line in streamed.iter_lines() if line.startswith("data: ")]
    assert streamed.headers["x-stamp-class"] == "/v1/completions" and len(events) == 6  # 5 tokens and [DONE]
    refused = httpx.get(proxied.v1 + "/models", timeout=10)  # no key: the gateway answers, the middleware never ran
    assert refused.status_code == 401 and "x-stamp-class" not in refused.headers
    assert "x-stamp-function" not in refused.headers


@pytest.mark.parametrize("path, error", [
    ("tests.sample_middleware.Absent", "cannot be imported (AttributeError"),
    ("tests.no_such_module.Stamp", "cannot be imported (ModuleNotFoundError"),
    ("tests.sample_middleware.NOT_MIDDLEWARE", "is neither a class (ASGI middleware) nor an async function"),
    ("not-a-path", "is not an import path like package.module.Name"),
])
def test_middleware_that_cannot_be_used_stops_the_start_before_the_models_load(tiny_gpt2_dir, path, error):
    started = subprocess.run([sys.executable, "-m", "server", "--model", str(tiny_gpt2_dir), "--middleware", path],
                             capture_output=True, text=True, timeout=60, cwd=PROJECT_ROOT)
    assert started.returncode == 2 and error in started.stderr, started.stderr
    assert "serving model" not in started.stderr


def test_disable_fastapi_docs_serves_no_docs(undocumented):
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert httpx.get(undocumented.base_url + path, timeout=10).status_code == 404, path
    assert httpx.get(undocumented.v1 + "/models", timeout=10).status_code == 200


def test_disable_log_requests_wins_over_the_environment(undocumented):
    assert httpx.post(undocumented.v1 + "/completions", json=BODY, timeout=60).status_code == 200
    assert "A secret prompt" not in undocumented.log_text()
    assert logged_bodies(undocumented) == []


def stream_chunks(server: ServerProcess, path: str, body: dict) -> list[dict]:
    with httpx.stream("POST", server.v1 + path, json={"model": "tiny", "max_tokens": 3, "ignore_eos": True,
                                                      "stream": True, **body}, timeout=60) as reply:
        lines = [line[len("data: "):] for line in reply.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


@pytest.mark.parametrize("path, body", [("/completions", {"prompt": "Once"}),
                                        ("/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]})])
def test_force_include_usage_ends_every_stream_with_usage(undocumented, path, body):
    chunks = stream_chunks(undocumented, path, body)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3
    assert all(chunk.get("usage") is None for chunk in chunks[:-1])
    continuous = stream_chunks(undocumented, path, {**body, "stream_options": {"continuous_usage_stats": True}})
    assert all(chunk.get("usage") for chunk in continuous)  # as vLLM: continuous stats once usage is included


def test_the_positional_model_comes_first_among_the_models():
    assert parse_config(["a=/models/a", "--model", "b=/models/b"], {}).models == ("a=/models/a", "b=/models/b")
    assert parse_config(["--model", "b=/models/b"], {}).models == ("b=/models/b",)


@pytest.mark.parametrize("path", ["llm", "/llm?x=1", "/l m"])
def test_a_root_path_that_is_no_path_prefix_is_refused(path):
    with pytest.raises(SystemExit):
        parse_config(["--root-path", path], {})


def server_load(server: ServerProcess, prefix: str = "") -> int:
    reply = httpx.get(server.base_url + prefix + "/load", timeout=10)  # open, like /health: no key
    assert reply.status_code == 200, reply.text
    return reply.json()["server_load"]


@pytest.mark.parametrize("prefix", ["", "/llm"])
def test_load_counts_the_requests_in_flight_until_their_stream_ends(proxied, prefix):
    assert server_load(proxied, prefix) == 0
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4000,
            "ignore_eos": True, "stream": True}
    with httpx.stream("POST", proxied.v1 + "/chat/completions", json=body, headers=KEY, timeout=60) as reply:
        lines = reply.iter_lines()  # held: a generator let go closes the stream
        next(line for line in lines if line.startswith("data: {"))
        assert server_load(proxied, prefix) == 1
        httpx.post(proxied.base_url + "/tokenize", json={"prompt": "Hi"}, headers=KEY, timeout=10)
        assert server_load(proxied, prefix) == 1  # finished, and not model work anyway
    deadline = time.monotonic() + 10
    while server_load(proxied, prefix) and time.monotonic() < deadline:  # the disconnect reaches the server
        time.sleep(0.05)
    assert server_load(proxied, prefix) == 0


def test_without_load_tracking_there_is_no_load_route(undocumented):
    assert httpx.get(undocumented.base_url + "/load", timeout=10).status_code == 404


@pytest.mark.parametrize("method, path, counted", [
    ("POST", "/v1/completions", True), ("POST", "/v1/chat/completions", True), ("POST", "/v1/responses", True),
    ("GET", "/v1/responses/resp_1", True), ("POST", "/v1/responses/resp_1/cancel", True),
    ("POST", "/v1/embeddings", True), ("POST", "/v2/rerank", True), ("POST", "/invocations", True),
    ("POST", "/v1/perplexity", True), ("DELETE", "/v1/responses/resp_1", False),
    ("GET", "/v1/responses/resp_1/input_items", False), ("POST", "/tokenize", False), ("GET", "/v1/models", False),
    ("GET", "/load", False), ("POST", "/v1/completions/x", False)])
def test_load_counts_the_routes_that_run_a_model(method, path, counted):
    assert counts_as_load(method, path) is counted


def access_lines(server: ServerProcess) -> list[dict]:
    lines = [json.loads(line) for line in server.log_text().splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("logger") == "gptserve.access"]


def test_requests_to_the_quiet_endpoints_get_no_access_line(undocumented):
    for _ in range(3):
        assert httpx.get(undocumented.base_url + "/health", timeout=10).status_code == 200
        assert httpx.get(undocumented.v1 + "/models", timeout=10).status_code == 200
    assert httpx.post(undocumented.v1 + "/completions", json=BODY, timeout=60).status_code == 200
    routes = {line["route"] for line in access_lines(undocumented)}
    assert "/v1/completions" in routes and not routes & {"/health", "/v1/models"}


def test_uvicorn_logs_at_its_own_level(undocumented):
    lines = [json.loads(line) for line in undocumented.log_text().splitlines() if line.startswith("{")]
    assert any(line["logger"] == "gptserve" for line in lines)  # ours stay at --log-level's info
    assert not [line for line in lines if line["logger"].startswith("uvicorn") and line["level"] == "INFO"]


def test_disable_access_log_leaves_out_every_request_line(caplog):
    from fastapi.testclient import TestClient

    from server.app import create_app
    from server.config import ServerConfig

    caplog.set_level(logging.INFO, logger="gptserve.access")
    for flags, logged in (([], True), (["--disable-uvicorn-access-log"], False), (["--disable-access-log"], False)):
        caplog.clear()
        client = TestClient(create_app(ServerConfig(http=parse_config(flags, {}).http), {}))
        assert client.get("/version").status_code == 200
        assert any(record.name == "gptserve.access" for record in caplog.records) is logged, flags


def test_models_name_the_path_they_were_given_as_their_root(undocumented, tiny_gpt2_dir):
    """vLLM's ModelCard root (the path or hub id given) and parent (an adapter's base model: none here)."""
    from server.config import HubConfig
    from server.model_source import resolve_model_spec

    [card] = httpx.get(undocumented.v1 + "/models", timeout=10).json()["data"]
    assert (card["id"], card["root"], card["parent"]) == ("tiny", str(tiny_gpt2_dir), None)
    assert httpx.get(undocumented.v1 + "/models/tiny", timeout=10).json()["root"] == str(tiny_gpt2_dir)
    assert resolve_model_spec(str(tiny_gpt2_dir), HubConfig()).root == str(tiny_gpt2_dir)
    assert resolve_model_spec(f"x={tiny_gpt2_dir}", HubConfig()).root == str(tiny_gpt2_dir)
