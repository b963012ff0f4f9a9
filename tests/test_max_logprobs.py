"""vLLM's --max-logprobs: how many alternatives a token a request may ask for (20, OpenAI's limit, by default)."""

from __future__ import annotations

import httpx
import pytest

from server.cli import parse_config
from tests.server_process import ServerProcess

LIMIT = 30


@pytest.fixture(scope="module")
def server(tiny_gpt2_dir):
    with ServerProcess(["--model", f"tiny={tiny_gpt2_dir}", "--max-logprobs", str(LIMIT)]) as running:
        yield running


def post(server, path: str, body: dict) -> httpx.Response:
    greedy = {"max_tokens": 2, "ignore_eos": True, "temperature": 0}  # the chosen token is its top alternative
    fields = {"max_output_tokens": 2} if path == "/responses" else greedy
    return httpx.post(server.v1 + path, json={"model": "tiny", **fields, **body}, timeout=60)


def test_up_to_the_limit_every_token_carries_that_many_alternatives(server):
    completion = post(server, "/completions", {"prompt": "Hello there", "logprobs": LIMIT, "prompt_logprobs": LIMIT})
    assert completion.status_code == 200, completion.text
    choice = completion.json()["choices"][0]
    assert [len(top) for top in choice["logprobs"]["top_logprobs"]] == [LIMIT, LIMIT]
    assert len(choice["prompt_logprobs"][1]) >= LIMIT  # the prompt token and its LIMIT likeliest alternatives
    chat = post(server, "/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "logprobs": True,
                                              "top_logprobs": LIMIT})
    assert chat.status_code == 200, chat.text
    assert [len(entry["top_logprobs"]) for entry in chat.json()["choices"][0]["logprobs"]["content"]] == [LIMIT] * 2


@pytest.mark.parametrize("path, body, param", [
    ("/completions", {"prompt": "Hello", "logprobs": LIMIT + 1}, "logprobs"),
    ("/completions", {"prompt": "Hello", "prompt_logprobs": LIMIT + 1}, "prompt_logprobs"),
    ("/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "logprobs": True,
                           "top_logprobs": 2**62}, "top_logprobs"),
    ("/responses", {"input": "Hi", "top_logprobs": LIMIT + 1}, "top_logprobs"),
])
def test_more_than_the_limit_is_refused_naming_the_field(server, path, body, param):
    reply = post(server, path, body)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == param and "--max-logprobs" in error["message"]


def test_the_openapi_document_states_the_limit(server):
    schemas = httpx.get(server.base_url + "/openapi.json", timeout=10).json()["components"]["schemas"]
    for schema, field in [("CompletionRequest", "logprobs"), ("CompletionRequest", "prompt_logprobs"),
                          ("ChatCompletionRequest", "top_logprobs"), ("ResponsesRequest", "top_logprobs")]:
        branches = schemas[schema]["properties"][field]["anyOf"]
        assert [branch["maximum"] for branch in branches if branch.get("type") == "integer"] == [LIMIT], schema


@pytest.mark.parametrize("value, expected", [("-1", -1), ("0", 0), ("100", 100)])
def test_minus_one_names_the_whole_vocabulary(value, expected):
    assert parse_config(["--max-logprobs", value], {}).frontend.max_logprobs == expected


def test_below_minus_one_is_refused():
    with pytest.raises(SystemExit):
        parse_config(["--max-logprobs", "-2"], {})
