"""Which request fields are accepted: those that change nothing here are taken (so OpenAI clients that send them
work) and change nothing; those that would change the output but are not served are a 400 naming them.
``stream_options.continuous_usage_stats`` (vLLM's) puts the usage so far on every streamed chunk."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.server_process import ServerProcess

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there!"}]
GREEDY = {"model": "tiny", "temperature": 0, "max_tokens": 8, "ignore_eos": True}
NO_OP_FIELDS = {"user": "u-1", "store": False, "metadata": {"team": "a"}, "service_tier": "auto",
                "prompt_cache_key": "k-1", "safety_identifier": "hashed-user"}


@pytest.fixture(scope="module")
def server(tiny_gpt2_dir):
    with ServerProcess(["--model", f"tiny={tiny_gpt2_dir}"]) as running:
        yield running


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.v1, timeout=60) as client:
        yield client


def events(http: httpx.Client, path: str, body: dict) -> list[dict]:
    with http.stream("POST", path, json=body | {"stream": True}) as response:
        assert response.status_code == 200, response.read()
        lines = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_fields_that_change_nothing_are_accepted_and_change_nothing(http):
    plain_chat = http.post("/chat/completions", json=GREEDY | {"messages": MESSAGES}).json()
    named = [MESSAGES[0], MESSAGES[1] | {"name": "ada"}]
    chat = http.post("/chat/completions", json=GREEDY | NO_OP_FIELDS | {
        "messages": named, "response_format": {"type": "text"}}).json()
    assert chat["choices"][0]["message"] == plain_chat["choices"][0]["message"]
    assert chat["usage"]["prompt_tokens"] == plain_chat["usage"]["prompt_tokens"]
    plain_text = http.post("/completions", json=GREEDY | {"prompt": "Once"}).json()
    text = http.post("/completions", json=GREEDY | NO_OP_FIELDS | {"prompt": "Once"}).json()
    assert text["choices"][0]["text"] == plain_text["choices"][0]["text"]


@pytest.mark.parametrize(("field", "value"), [
    ("modalities", ["text", "audio"]), ("audio", {"voice": "alloy", "format": "wav"}),
    ("prediction", {"type": "content", "content": "x"}), ("web_search_options", {}), ("verbosity", "low")])
def test_fields_that_would_change_the_output_are_400_naming_them(http, field, value):
    response = http.post("/chat/completions", json=GREEDY | {"messages": MESSAGES, field: value})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == field and field in error["message"]


def assert_usage_so_far_on_every_chunk(chunks: list[dict], expected_completion_tokens: int) -> None:
    *streamed, last = chunks
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == expected_completion_tokens
    counts = [chunk["usage"]["completion_tokens"] for chunk in streamed]
    assert counts == sorted(counts) and counts[0] < counts[-1] <= expected_completion_tokens
    for chunk in chunks:
        usage = chunk["usage"]
        assert usage["prompt_tokens"] == last["usage"]["prompt_tokens"]
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


@pytest.mark.parametrize(("path", "body"), [("/completions", {"prompt": "Once", "n": 2}),
                                            ("/chat/completions", {"messages": MESSAGES, "n": 2})])
def test_continuous_usage_stats_put_the_usage_so_far_on_every_chunk(http, path, body):
    options = {"include_usage": True, "continuous_usage_stats": True}
    chunks = events(http, path, GREEDY | body | {"stream_options": options})
    assert_usage_so_far_on_every_chunk(chunks, expected_completion_tokens=2 * GREEDY["max_tokens"])


@pytest.mark.parametrize("options", [{"include_usage": True}, {"continuous_usage_stats": True}])
def test_usage_is_only_on_the_last_chunk_unless_both_options_are_set(http, options):
    chunks = events(http, "/completions", GREEDY | {"prompt": "Once", "stream_options": options})
    with_usage = [i for i, chunk in enumerate(chunks) if chunk.get("usage") is not None]
    assert with_usage == ([len(chunks) - 1] if options.get("include_usage") else [])
