"""SageMaker's contract as vLLM serves it: /ping answers as /health does, and /invocations sends each body to the
API its fields name, answered exactly as at that API's own path."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.same_answer import assert_same_answer
from tests.server_process import ServerProcess

KEY = "sagemaker-test-key"
AUTH = {"authorization": f"Bearer {KEY}"}
CHAT_TEMPLATE = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}assistant:"
BODIES = {
    "/v1/chat/completions": {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
                             "temperature": 0, "logprobs": True, "top_logprobs": 2},
    "/v1/completions": {"model": "tiny", "prompt": "The quick brown fox", "max_tokens": 5, "temperature": 0},
    "/v1/embeddings": {"model": "tiny", "input": ["fox", "a brown fox"]},
    "/v1/score": {"model": "tiny", "text_1": "fox", "text_2": ["a fox", "the sea"]},
    "/v1/rerank": {"model": "tiny", "query": "fox", "documents": ["a fox", "the sea"], "top_n": 1},
}


@pytest.fixture(scope="module")
def server(tiny_gpt2_dir, tmp_path_factory):
    template = tmp_path_factory.mktemp("template") / "chat.jinja"
    template.write_text(CHAT_TEMPLATE)
    args = ["--model", f"tiny={tiny_gpt2_dir}", "--chat-template", str(template), "--api-key", KEY]
    with ServerProcess(args) as running:
        yield running


@pytest.mark.parametrize("path", BODIES)
def test_invocations_answers_each_api_as_its_own_route_does(server, path):
    body = BODIES[path]
    direct = httpx.post(server.base_url + path, json=body, headers=AUTH, timeout=60)
    invoked = httpx.post(server.base_url + "/invocations", json=body, headers=AUTH, timeout=60)
    assert direct.status_code == invoked.status_code == 200, invoked.text
    assert_same_answer(invoked.json(), direct.json(), path)


def test_invocations_streams_when_asked(server):
    body = {**BODIES["/v1/completions"], "stream": True}
    with httpx.stream("POST", server.base_url + "/invocations", json=body, headers=AUTH, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    text = "".join(json.loads(event)["choices"][0]["text"] for event in events[:-1])
    whole = httpx.post(server.base_url + "/v1/completions", json=BODIES["/v1/completions"], headers=AUTH, timeout=60)
    assert text == whole.json()["choices"][0]["text"]


@pytest.mark.parametrize(("body", "param", "message"), [
    ({"model": "tiny"}, None, "the body names no API"),
    ({"model": "tiny", "prompt": "x", "max_tokens": -1}, "max_tokens", "max_tokens"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "prompt": "x"}, "prompt", "prompt"),
    ({"model": "nope", "input": "x"}, "model", "does not exist"),
])
def test_invocations_refuses_as_the_api_would_and_names_the_field(server, body, param, message):
    reply = httpx.post(server.base_url + "/invocations", json=body, headers=AUTH, timeout=60)
    assert reply.status_code in (400, 404), reply.text
    error = reply.json()["error"]
    assert error["param"] == param and message in error["message"], error


def test_ping_is_health_without_the_key_while_invocations_needs_it(server):
    for method in ("GET", "POST"):
        reply = httpx.request(method, server.base_url + "/ping", timeout=10)
        assert reply.status_code == 200 and reply.json()["status"] == "ok", reply.text
    refused = httpx.post(server.base_url + "/invocations", json=BODIES["/v1/completions"], timeout=10)
    assert refused.status_code == 401
