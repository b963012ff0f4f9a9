"""Background responses and truncation on a real GPT-OSS engine under uvicorn: a cancelled run frees its KV
blocks, a background stream outlives its client and resumes, and truncation meets the engine's own admission."""

from __future__ import annotations

import json
import os
import re
import signal
import time

import httpx
import openai
import pytest

from tests.server_process import ServerProcess, exits_within

MAX_MODEL_LEN = 1024
# A string the grammar will not let end before 3,000 characters: the run lasts its max_output_tokens.
LONG_TEXT = {"format": {"type": "json_schema", "name": "long", "strict": True, "schema": {
    "type": "object", "properties": {"text": {"type": "string", "minLength": 3000, "maxLength": 3000}},
    "required": ["text"], "additionalProperties": False}}}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from models.testing.gpt_oss_checkpoint import write_tiny_gpt_oss

    checkpoint = write_tiny_gpt_oss(tmp_path_factory.mktemp("tiny") / "gpt-oss")
    with ServerProcess(["--model", f"oss={checkpoint}", "--max-model-len", str(MAX_MODEL_LEN),
                        "--drain-timeout", "1"]) as running:
        yield running


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=120)


def gauge(server: ServerProcess, name: str) -> float:
    text = httpx.get(server.base_url + "/metrics", timeout=10).text
    match = re.search(rf'^gptserve:{name}{{model_name="oss"}} (\S+)$', text, re.MULTILINE)
    assert match, name
    return float(match.group(1))


def settle(server: ServerProcess, seconds: float = 20.0) -> None:
    """Until no request runs and no KV block is held."""
    deadline = time.monotonic() + seconds
    while (gauge(server, "num_requests_running"), gauge(server, "kv_cache_blocks_used")) != (0, 0):
        assert time.monotonic() < deadline, "a request or its KV blocks outlived the run"
        time.sleep(0.05)


def finished(client: openai.OpenAI, response_id: str, seconds: float = 60.0):
    deadline = time.monotonic() + seconds
    while (response := client.responses.retrieve(response_id)).status in ("queued", "in_progress"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return response


def test_cancelling_a_running_background_response_frees_its_request_and_kv_blocks(server, client):
    created = client.responses.create(model="oss", input="Write at length.", background=True, text=LONG_TEXT,
                                      max_output_tokens=900)
    cancelled = client.responses.cancel(created.id)
    assert cancelled.status == "cancelled" and cancelled.usage.output_tokens < 900
    settle(server, seconds=3.0)  # the whole run takes ~10 s here: only an abort frees it this soon
    assert client.responses.retrieve(created.id).status == "cancelled"
    after = client.responses.create(model="oss", input="Hi!", max_output_tokens=8)
    assert after.status in ("completed", "incomplete"), "the engine serves on"


def test_a_background_stream_outlives_its_client_and_resumes_where_it_left(server, client):
    body = {"model": "oss", "input": "Hi!", "temperature": 0, "max_output_tokens": 40}
    with httpx.stream("POST", server.v1 + "/responses", json=body | {"background": True, "stream": True},
                      timeout=60) as stream:
        first = next(json.loads(line[len("data: "):]) for line in stream.iter_lines() if line.startswith("data: "))
    assert first["type"] == "response.created" and first["sequence_number"] == 0
    response_id = first["response"]["id"]
    done = finished(client, response_id)
    foreground = client.responses.create(**body)
    assert done.status == foreground.status and done.output_text == foreground.output_text
    assert done.usage.output_tokens == foreground.usage.output_tokens
    rest = list(client.responses.retrieve(response_id, stream=True, starting_after=0))
    assert [event.sequence_number for event in rest] == list(range(1, len(rest) + 1))
    assert rest[-1].type == f"response.{done.status}" and rest[-1].response.output_text == done.output_text
    settle(server)


def test_a_foreground_stream_cut_off_by_its_client_frees_its_request_and_is_not_stored(server, client):
    """Retrievable while it runs on its connection; once the client goes, aborted (its KV freed) and gone."""
    body = {"model": "oss", "input": "Write at length.", "text": LONG_TEXT, "max_output_tokens": 900, "stream": True}
    with httpx.stream("POST", server.v1 + "/responses", json=body, timeout=60) as stream:
        lines = stream.iter_lines()  # held: a line iterator let go closes the connection
        first = next(json.loads(line[len("data: "):]) for line in lines if line.startswith("data: "))
        response_id = first["response"]["id"]
        assert client.responses.retrieve(response_id).status == "in_progress"
    settle(server, seconds=3.0)  # the whole run takes ~10 s here: only an abort frees it this soon
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response_id)


def test_truncation_auto_fits_a_conversation_the_engine_would_refuse(client):
    items = [{"type": "message", "role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i} " * 40}
             for i in range(25)]
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(model="oss", input=items, max_output_tokens=8)
    assert refused.value.body["param"] == "prompt"
    response = client.responses.create(model="oss", input=items, max_output_tokens=8, truncation="auto")
    assert MAX_MODEL_LEN - 400 < response.usage.input_tokens <= MAX_MODEL_LEN - 8
    listed = client.responses.input_items.list(response.id, limit=100)
    assert len(listed.data) == 25, "the input items are the request's, whatever truncation dropped"


def test_logprobs_are_the_engine_s_for_the_answer_s_tokens_as_chat_reports_them(client):
    """Greedy and constrained to the final channel, the same conversation through chat completions and responses:
    the answer's logprobs are chat's, less the forced header and the stop token."""
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["n"], "additionalProperties": False}
    chat = client.chat.completions.create(
        model="oss", messages=[{"role": "user", "content": "Hi!"}], temperature=0, max_tokens=40, logprobs=True,
        top_logprobs=2, response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": schema}})
    response = client.responses.create(
        model="oss", input="Hi!", temperature=0, max_output_tokens=40, top_logprobs=2,
        include=["message.output_text.logprobs"], text={"format": {"type": "json_schema", "name": "n",
                                                                  "schema": schema}})
    [part] = response.output[-1].content
    assert part.text == chat.choices[0].message.content
    ours = [(entry.token, entry.logprob, [alt.logprob for alt in entry.top_logprobs]) for entry in part.logprobs]
    chats = [(entry.token, entry.logprob, [alt.logprob for alt in entry.top_logprobs])
             for entry in chat.choices[0].logprobs.content]
    assert [token for token, _, _ in chats[:3]] == ["<|channel|>", "final", "<|message|>"]
    assert chats[-1][0] == "<|return|>"  # chat scores every token generated, the stop token included
    assert chats[3:-1] == ours, "chat's, less the forced header and the stop token (not the answer's text)"
    assert b"".join(bytes(entry.bytes) for entry in part.logprobs) == part.text.encode()


def test_usage_counts_the_prompt_tokens_the_prefix_cache_served(client):
    text = " ".join(f"item {i}" for i in range(60))  # many full KV blocks
    first = client.responses.create(model="oss", input=text, max_output_tokens=2, temperature=0)
    again = client.responses.create(model="oss", input=text, max_output_tokens=2, temperature=0)
    cached = again.usage.input_tokens_details.cached_tokens
    assert first.usage.input_tokens_details.cached_tokens < cached < again.usage.input_tokens  # (its system
    # message's blocks may have been cached before: other requests begin with the same one)


def test_sigterm_ends_a_followed_background_response_as_failed_by_the_drain_deadline(server):
    """Last in this module: it stops the server."""
    body = {"model": "oss", "input": "Write at length.", "background": True, "stream": True, "text": LONG_TEXT,
            "max_output_tokens": 900}
    with httpx.stream("POST", server.v1 + "/responses", json=body, timeout=60) as stream:
        lines = (line for line in stream.iter_lines() if line.startswith("data: "))
        assert json.loads(next(lines)[len("data: "):])["type"] == "response.created"
        os.kill(server.pid, signal.SIGTERM)
        last = json.loads(list(lines)[-1][len("data: "):])
    assert last["type"] == "response.failed", "the run takes ~10 s; the 1 s drain deadline aborts it"
    assert last["response"]["error"]["code"] == "server_error"
    assert exits_within(server.pid, 8.0)
    assert "Traceback" not in server.log_text()

