"""The server's log: one JSON object per line, one access line per request carrying its request id, no prompt
text unless --log-requests asks for it, and --log-level (or GPTSERVE_LOG_LEVEL) sets what is written."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from tests.server_process import ServerProcess

SECRET_PROMPT = "zebra quartz marmalade"


def complete(server: ServerProcess, request_id: str | None = None) -> httpx.Response:
    headers = {"x-request-id": request_id} if request_id else {}
    body = {"model": "tiny", "prompt": SECRET_PROMPT, "max_tokens": 3}
    response = httpx.post(server.v1 + "/completions", json=body, headers=headers, timeout=30)
    assert response.status_code == 200
    return response


def log_lines(server: ServerProcess, until: str = "", timeout: float = 10.0) -> list[dict]:
    """Every line the server wrote to stdout and stderr, parsed; waits until one contains ``until``."""
    deadline = time.monotonic() + timeout
    while until not in server.log_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    text = server.log_text()
    assert until in text, f"{until!r} never logged:\n{text}"
    lines = []
    for raw in text.splitlines():
        try:
            lines.append(json.loads(raw))
        except json.JSONDecodeError:
            pytest.fail(f"log line is not JSON: {raw!r}")
    return lines


@pytest.fixture(scope="module")
def default_server(tiny_gpt2_dir):
    with ServerProcess(["--model", f"tiny={tiny_gpt2_dir}"]) as running:
        yield running


def test_every_line_is_a_json_object_with_time_level_logger_and_message(default_server):
    request_id = complete(default_server).headers["x-request-id"]
    httpx.get(default_server.base_url + "/no/such/path", timeout=10)
    lines = log_lines(default_server, until=request_id)
    assert len(lines) >= 5  # start-up lines and the requests' lines
    for line in lines:
        assert isinstance(line, dict) and {"ts", "level", "logger", "msg"} <= line.keys(), line


def test_each_request_logs_one_access_line_with_its_request_id(default_server):
    given = complete(default_server, request_id="trace-abc-123")
    generated = complete(default_server)
    assert given.headers["x-request-id"] == "trace-abc-123"
    generated_id = generated.headers["x-request-id"]
    lines = log_lines(default_server, until=generated_id)
    for request_id in ("trace-abc-123", generated_id):
        (access,) = [line for line in lines if line.get("request_id") == request_id]
        assert access["logger"] == "gptserve.access" and access["route"] == "/v1/completions"
        assert access["status"] == 200 and access["completion_tokens"] == 3 and access["latency_ms"] >= 0


def test_prompts_are_not_logged_by_default(default_server):
    request_id = complete(default_server).headers["x-request-id"]
    log_lines(default_server, until=request_id)
    assert SECRET_PROMPT not in default_server.log_text()


def test_log_requests_adds_the_body_and_debug_level_is_accepted(tiny_gpt2_dir):
    with ServerProcess(["--model", f"tiny={tiny_gpt2_dir}", "--log-level", "debug", "--log-requests"]) as server:
        request_id = complete(server).headers["x-request-id"]
        (access,) = [line for line in log_lines(server, until=request_id) if line.get("request_id") == request_id]
        assert SECRET_PROMPT in access["body"]


def test_log_level_from_the_environment_drops_info_lines(tiny_gpt2_dir):
    with ServerProcess(["--model", f"tiny={tiny_gpt2_dir}"], env={"GPTSERVE_LOG_LEVEL": "warning"}) as server:
        complete(server)
        httpx.get(server.base_url + "/v1/models/no-such-model", timeout=10)
        time.sleep(0.3)  # the access line, were it written, follows the response within milliseconds
        lines = log_lines(server)
        assert all(line["level"] in ("WARNING", "ERROR", "CRITICAL") for line in lines), lines
        assert not [line for line in lines if line["logger"] == "gptserve.access"]
