"""SSE streaming for both endpoints: same text as non-streaming, usage chunk, no leaked stop strings; a client
that disconnects (streaming or not) has its sequences aborted and their KV blocks freed."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from models.testing.gpt2_checkpoint import write_tiny_gpt2
from tests.server_process import ServerProcess

PROMPT = "The quick brown fox"
LONG_MAX_TOKENS = 4000


@pytest.fixture(scope="module")
def server(tiny_gpt2_dir):
    with ServerProcess(["--model", f"tiny={tiny_gpt2_dir}"]) as running:
        yield running


@pytest.fixture(scope="module")
def long_server(tmp_path_factory):
    """A context of 4096 tokens, so a request can run far longer than any test waits."""
    model_dir = write_tiny_gpt2(tmp_path_factory.mktemp("long") / "gpt2", n_positions=4096)
    with ServerProcess(["--model", f"long={model_dir}"]) as running:
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


async def disconnect_once_running(server: ServerProcess, body: dict, clients: int) -> None:
    """``clients`` requests; each connection is dropped once the engine runs all of them (after the first
    event for a stream), so every request was admitted and is mid-generation when its client goes."""

    async def one(http: httpx.AsyncClient, started: asyncio.Event) -> None:
        async with http.stream("POST", "/completions", json=body) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    started.set()
                    await asyncio.Event().wait()  # hold the stream open until cancelled

    async def all_running() -> None:
        while True:
            stats = (await asyncio.to_thread(server.health))["models"]["long"]
            if stats["running"] == clients * body["n"]:
                return
            await asyncio.sleep(0.02)

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=server.v1, timeout=60, limits=limits) as http:
        events = [asyncio.Event() for _ in range(clients)]
        tasks = [asyncio.create_task(one(http, event)) for event in events]
        await asyncio.wait_for(all_running(), 30)
        if body["stream"]:
            await asyncio.wait_for(asyncio.gather(*(event.wait() for event in events)), 30)
        for task in tasks:
            task.cancel()  # closes the connection
        await asyncio.gather(*tasks, return_exceptions=True)


@pytest.mark.parametrize(("stream", "n"), [(True, 1), (True, 3), (False, 1), (False, 3)])
def test_client_disconnect_aborts_every_sequence_long_before_it_could_finish(long_server, stream, n):
    """Each sequence could run 4000 tokens; the disconnects must end them as aborts (none reaches its
    length) and free every KV block within seconds, having generated a small part of what was asked."""
    clients = 4
    body = {"model": "long", "prompt": PROMPT, "max_tokens": LONG_MAX_TOKENS, "ignore_eos": True, "n": n,
            "stream": stream}
    before = finished_counts(long_server)
    asyncio.run(disconnect_once_running(long_server, body, clients))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        stats = long_server.health()["models"]["long"]
        if stats["running"] == stats["waiting"] == stats["kv_blocks_used"] == 0:
            break
        time.sleep(0.05)
    assert (stats["running"], stats["waiting"], stats["kv_blocks_used"]) == (0, 0, 0)
    after = finished_counts(long_server)
    assert after["abort"] - before["abort"] == clients * n
    assert after["length"] == before["length"], "a sequence ran to max_tokens: it was never aborted"
    generated = after["generation_tokens"] - before["generation_tokens"]
    assert generated < 0.1 * clients * n * LONG_MAX_TOKENS


def finished_counts(server: ServerProcess) -> dict[str, float]:
    """Sequences finished per reason, and tokens generated, as /metrics counts them."""
    text = httpx.get(server.base_url + "/metrics", timeout=10).text
    counts = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "gptserve:request_success_total" and sample.labels["model_name"] == "long":
                counts[sample.labels["finished_reason"]] = sample.value
            elif sample.name == "gptserve:generation_tokens_total" and sample.labels["model_name"] == "long":
                counts["generation_tokens"] = sample.value
    return counts
