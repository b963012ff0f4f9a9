"""SSE streaming for both endpoints: same text as non-streaming, usage chunk, no leaked stop strings, aborts."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest

from tests.server_process import ServerProcess

PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def server(tiny_gpt2_dir):
    with ServerProcess(["--model", f"tiny={tiny_gpt2_dir}"]) as running:
        yield running


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0)


def test_completion_stream_concatenates_to_the_non_stream_text(client):
    kwargs = {"model": "tiny", "prompt": PROMPT, "max_tokens": 20, "temperature": 1.0, "seed": 7, "n": 2}
    whole = client.completions.create(**kwargs)
    texts, finish, usage = ["", ""], [None, None], None
    for chunk in client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}):
        if chunk.usage is not None:
            assert chunk.choices == []
            usage = chunk.usage
        for choice in chunk.choices:
            assert finish[choice.index] is None, "nothing may follow a choice's finish_reason"
            texts[choice.index] += choice.text
            finish[choice.index] = choice.finish_reason
    assert texts == [c.text for c in whole.choices]
    assert finish == [c.finish_reason for c in whole.choices]
    assert usage.completion_tokens == whole.usage.completion_tokens
    assert usage.prompt_tokens == whole.usage.prompt_tokens


def test_chat_stream_sends_role_first_then_content_then_finish(client):
    kwargs = {"model": "tiny", "messages": [{"role": "user", "content": "Hi there"}], "max_tokens": 12,
              "temperature": 0}
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].object == "chat.completion.chunk"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == whole.choices[0].finish_reason and not any(finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_stop_string_never_leaks_in_stream(client):
    full = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=24, temperature=0).choices[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 4]
    pieces = [c.choices[0] for c in client.completions.create(model="tiny", prompt=PROMPT, max_tokens=24,
                                                                temperature=0, stop=stop, stream=True)]
    text = "".join(p.text for p in pieces)
    assert text == full[: full.index(stop)]
    assert all(stop not in p.text for p in pieces)
    assert pieces[-1].finish_reason == "stop"


def test_streamed_text_has_no_replacement_char_the_whole_text_lacks(client):
    """Sampling at high temperature emits byte-fragment tokens; chunks must only split between characters."""
    kwargs = {"model": "tiny", "prompt": "日本語のテキスト", "max_tokens": 60, "temperature": 2.0, "seed": 3,
              "extra_body": {"ignore_eos": True}}
    whole = client.completions.create(**kwargs).choices[0].text
    pieces = [c.choices[0].text for c in client.completions.create(**kwargs, stream=True)]
    assert "".join(pieces) == whole
    assert sum(p.count("\ufffd") for p in pieces) == whole.count("\ufffd")


def test_sse_wire_format_ends_with_done(server):
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 3, "stream": True}
    with httpx.stream("POST", server.v1 + "/completions", json=body, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in events)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["object"] == "text_completion"


def test_streams_closed_after_first_chunk_free_every_sequence_and_block(server):
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 100, "ignore_eos": True, "stream": True}

    async def open_and_abandon() -> None:
        async with httpx.AsyncClient(base_url=server.v1, timeout=60) as http:
            async with http.stream("POST", "/completions", json=body) as response:
                async for line in response.aiter_lines():
                    if line.startswith("data: "):
                        return

    async def twenty() -> None:
        await asyncio.gather(*(open_and_abandon() for _ in range(20)))

    asyncio.run(twenty())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        stats = server.health()["models"]["tiny"]
        if stats["running"] == 0 and stats["waiting"] == 0 and stats["kv_blocks_used"] == 0:
            break
        time.sleep(0.1)
    assert stats["running"] == 0 and stats["waiting"] == 0
    assert stats["kv_blocks_used"] == 0


def test_non_streaming_client_disconnect_aborts_the_request(server):
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 110, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.v1 + "/completions", json=body, timeout=0.05)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and server.health()["models"]["tiny"]["kv_blocks_used"]:
        time.sleep(0.05)
    assert server.health()["models"]["tiny"]["kv_blocks_used"] == 0
