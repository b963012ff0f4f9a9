"""Every failure answers with the contract's error object, and the server keeps serving afterwards."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from tests.server_process import ServerProcess

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server(tiny_gpt2_dir):
    args = ["--model", f"tiny={tiny_gpt2_dir}", "--api-key", KEY, "--max-body-bytes", "20000",
            "--max-num-seqs", "1", "--max-queue", "1"]
    with ServerProcess(args) as running:
        yield running


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base_url, headers=AUTH, timeout=60) as client:
        yield client


def assert_error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert error["param"] == param
    return error


@pytest.mark.parametrize(("field", "value"), [
    ("temperature", 2.5), ("top_p", 0), ("n", 129), ("logprobs", 21), ("max_tokens", -1),
    ("presence_penalty", 3), ("stop", ["a"] * 17), ("suffix", "tail"), ("best_of", 2), ("prompt", [])])
def test_invalid_completion_field_is_400_naming_it(http, field, value):
    error = assert_error(http.post("/v1/completions", json={"model": "tiny", "prompt": "x", field: value}), 400,
                         field)
    assert error["type"] == "invalid_request_error"
    assert field in error["message"]


def test_unknown_field_is_refused_not_ignored(http):
    error = assert_error(http.post("/v1/completions", json={"model": "tiny", "prompt": "x", "fancy": 1}), 400,
                         "fancy")
    assert "fancy" in error["message"]


def test_token_ids_outside_the_vocabulary_are_400(http):
    assert_error(http.post("/v1/completions", json={"model": "tiny", "prompt": [1, 99999999]}), 400, "prompt")
    assert_error(http.post("/v1/completions", json={"model": "tiny", "prompt": "x", "logit_bias": {"-5": 1}}),
                 400, "logit_bias")


def test_prompt_plus_max_tokens_beyond_the_context_is_400(http):
    error = assert_error(http.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 500}),
                         400, "max_tokens")
    assert "128" in error["message"]


def test_bad_chat_messages_are_400(http):
    for messages in ([], [{"role": "tool", "content": "x"}], [{"role": "user", "content": [{"type": "image"}]}]):
        assert_error(http.post("/v1/chat/completions", json={"model": "tiny", "messages": messages}), 400,
                     "messages")


def test_malformed_json_is_400(http):
    response = http.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert_error(response, 400)


def test_unknown_model_is_404_model_not_found(server):
    client = openai.OpenAI(base_url=server.v1, api_key=KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError) as raised:
        client.completions.create(model="nope", prompt="x")
    assert raised.value.code == "model_not_found"
    assert raised.value.param == "model"


def test_unknown_route_and_wrong_method_use_the_error_shape(http):
    assert assert_error(http.get("/v1/nothing"), 404)["type"] == "not_found_error"
    assert_error(http.get("/v1/completions"), 405)


def test_missing_or_wrong_api_key_is_401_but_probes_stay_open(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        error = assert_error(httpx.get(server.v1 + "/models", headers=headers), 401)
        assert error["code"] == "invalid_api_key"
    assert httpx.get(server.base_url + "/health").status_code == 200
    assert httpx.get(server.base_url + "/metrics").status_code == 200


def test_body_over_the_limit_is_413_with_or_without_content_length(http):
    big = {"model": "tiny", "prompt": "x" * 30000}
    assert_error(http.post("/v1/completions", json=big), 413)

    def chunked():
        yield b'{"model": "tiny", "prompt": "'
        for _ in range(30):
            yield b"x" * 1000
        yield b'"}'

    assert_error(http.post("/v1/completions", content=chunked(), headers={"content-type": "application/json"}), 413)


def test_full_queue_is_429_with_retry_after(server):
    body = {"model": "tiny", "prompt": "x", "max_tokens": 60, "ignore_eos": True}

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.base_url, headers=AUTH, timeout=60) as client:
            return await asyncio.gather(*(client.post("/v1/completions", json=body) for _ in range(6)))

    responses = asyncio.run(burst())
    rejected = [r for r in responses if r.status_code == 429]
    assert rejected and any(r.status_code == 200 for r in responses)
    assert assert_error(rejected[0], 429)["type"] == "rate_limit_error"
    assert rejected[0].headers["retry-after"] == "1"


def test_request_id_is_echoed_or_generated(http):
    assert http.get("/health", headers={"x-request-id": "abc-123"}).headers["x-request-id"] == "abc-123"
    assert len(http.get("/health").headers["x-request-id"]) == 32
    assert http.post("/v1/completions", json={}).headers["x-request-id"]


def test_server_still_serves_after_all_of_the_above(http):
    response = http.post("/v1/completions", json={"model": "tiny", "prompt": "still alive", "max_tokens": 3})
    assert response.status_code == 200
    assert http.get("/health").json()["status"] == "ok"
