"""Faults: a model step that raises fails only its own requests (500 / an error event) and the engine serves on;
SIGTERM under load lets every in-flight stream finish with a finish_reason and the process exit 0.

The failing step is injected with server/engine/fault_injection.py: the server fails every step that feeds
token ``POISON`` to the model. ``POISON`` is picked from the tiny model's own greedy continuation of
``PROMPT``, so a streamed request sends some tokens before its step fails.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time

import httpx
import pytest

from tests.server_process import ServerProcess, exits_within
from tests.test_engine_core_process import core_pid
from tests.test_tensor_parallel_api import worker_pid

PROMPT = [464, 2068, 7586, 21831]  # "The quick brown fox"
POISON_AT = 3  # the poison is the 4th generated token: three go out before the failing step


@pytest.fixture(scope="module")
def greedy(tiny_gpt2_dir) -> list[int]:
    from models.generation import greedy_generate
    from models.loader import load_model

    loaded = load_model(tiny_gpt2_dir, "float32", "cpu")
    [ids] = greedy_generate(loaded.model, [PROMPT], 12, stop_token_ids=frozenset())
    return ids


@pytest.fixture(scope="module")
def poison(greedy) -> int:
    token = greedy[POISON_AT]
    assert token not in PROMPT and token not in greedy[:POISON_AT], "pick another PROMPT for this checkpoint"
    return token


@pytest.fixture(scope="module")
def server(tiny_gpt2_dir, poison):
    env = {"GPTSERVE_FAULT_INJECT_TOKEN_ID": str(poison)}
    with ServerProcess(["--model", f"tiny={tiny_gpt2_dir}"], env=env) as running:
        yield running


def completion(prompt: list[int], **fields) -> dict:
    return {"model": "tiny", "prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True} | fields


def assert_internal_error(response: httpx.Response) -> None:
    assert response.status_code == 500, response.text
    error = response.json()["error"]
    assert error["type"] == "internal_error" and "injected fault" in error["message"]


def assert_engine_clean(server: ServerProcess) -> None:
    health = server.health()
    stats = health["models"]["tiny"]
    assert health["status"] == "ok"
    assert (stats["running"], stats["waiting"], stats["kv_blocks_used"]) == (0, 0, 0)


def sse_events(response: httpx.Response) -> list[dict | str]:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def test_failed_step_is_a_500_error_object_and_the_engine_serves_on(server, poison):
    with httpx.Client(base_url=server.v1, timeout=60) as http:
        assert_internal_error(http.post("/completions", json=completion(PROMPT)))  # fails while decoding
        assert_internal_error(http.post("/completions", json=completion([*PROMPT, poison])))  # fails in prefill
        messages = [{"role": "user", "content": "hi"}]
        chat = http.post("/chat/completions", json={"model": "tiny", "messages": messages, "max_tokens": 4,
                                                    "logit_bias": {str(poison): 100}})
        assert_internal_error(chat)
        assert_internal_error(http.post("/perplexity", json={"model": "tiny", "input": [*PROMPT, poison]}))
        assert_internal_error(http.post("/embeddings", json={"model": "tiny", "input": [PROMPT, [*PROMPT, poison]]}))
        healthy = http.post("/completions", json=completion(PROMPT, max_tokens=POISON_AT))
    assert healthy.status_code == 200
    assert healthy.json()["choices"][0]["finish_reason"] == "length"
    assert_engine_clean(server)


def test_failed_step_mid_stream_ends_the_stream_with_an_error_event(server, greedy):
    with httpx.Client(base_url=server.v1, timeout=60) as http:
        with http.stream("POST", "/completions", json=completion(PROMPT, stream=True)) as response:
            assert response.status_code == 200
            events = sse_events(response)
        expected = http.post("/completions", json=completion(PROMPT, max_tokens=POISON_AT + 1)).json()
    *chunks, error, done = events
    assert done == "[DONE]"
    assert error["error"]["type"] == "internal_error"
    assert chunks and all(chunk["choices"][0]["finish_reason"] is None for chunk in chunks)
    streamed = "".join(chunk["choices"][0]["text"] for chunk in chunks)
    assert expected["choices"][0]["text"].startswith(streamed)
    assert_engine_clean(server)


def test_failure_before_the_first_chunk_is_a_plain_500(server, poison):
    with httpx.Client(base_url=server.v1, timeout=60) as http:
        assert_internal_error(http.post("/completions", json=completion([*PROMPT, poison], stream=True)))
    assert_engine_clean(server)


def test_requests_outside_the_failing_step_are_untouched(server, greedy):
    """A request that finished before the poisoned one arrived, and one sent after, are served exactly."""
    clean = completion(PROMPT, max_tokens=POISON_AT)

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.v1, timeout=60) as http:
            before = await http.post("/completions", json=clean)
            failed = await http.post("/completions", json=completion(PROMPT))
            after = await http.post("/completions", json=clean)
            return [before, failed, after]

    before, failed, after = asyncio.run(run())
    assert_internal_error(failed)
    assert before.json()["choices"][0]["text"] == after.json()["choices"][0]["text"]
    assert after.json()["usage"]["completion_tokens"] == POISON_AT


async def all_admitted(server: ServerProcess, count: int) -> None:
    while True:
        stats = await asyncio.to_thread(server.health)
        if stats["models"]["tiny"]["running"] + stats["models"]["tiny"]["waiting"] == count:
            return
        await asyncio.sleep(0.02)


def test_sigterm_under_load_finishes_every_stream_and_exits_0(tiny_gpt2_dir):
    with ServerProcess(["--model", f"tiny={tiny_gpt2_dir}", "--max-num-seqs", "2"]) as server:
        body = completion([11] * 8, max_tokens=60, stream=True)

        async def stream(http: httpx.AsyncClient) -> list[dict | str]:
            events = []
            async with http.stream("POST", "/completions", json=body) as response:
                assert response.status_code == 200, (await response.aread(), server.log_text()[-3000:])
                async for line in response.aiter_lines():
                    if line.startswith("data: "):
                        data = line[len("data: "):]
                        events.append(data if data == "[DONE]" else json.loads(data))
            return events

        async def run() -> list[list[dict | str]]:
            async with httpx.AsyncClient(base_url=server.v1, timeout=60) as http:
                tasks = [asyncio.create_task(stream(http)) for _ in range(4)]
                await asyncio.wait_for(all_admitted(server, 4), 30)  # every request is in flight, none done
                server._process.send_signal(signal.SIGTERM)
                return await asyncio.wait_for(asyncio.gather(*tasks), 60)

        results = asyncio.run(run())
        assert server._process.wait(timeout=30) == 0
    for events in results:
        assert events[-1] == "[DONE]"
        finishes = [e["choices"][0]["finish_reason"] for e in events[:-1] if "choices" in e and e["choices"]]
        assert finishes[-1] == "length", events[-3:]
        assert sum(len(e["choices"][0]["text"]) > 0 for e in events[:-1]) > 0


def test_past_the_drain_deadline_requests_end_with_503_and_streams_with_an_error_then_done(tmp_path):
    """--drain-timeout 2 and requests that would run far longer: after SIGTERM they are aborted at the
    deadline, each answered as the contract says, and the process still exits 0."""
    from models.testing.gpt2_checkpoint import write_tiny_gpt2

    model_dir = write_tiny_gpt2(tmp_path / "long", n_positions=4096)
    with ServerProcess(["--model", f"tiny={model_dir}", "--drain-timeout", "2"]) as server:
        body = completion(PROMPT, max_tokens=4000)

        async def stream(http: httpx.AsyncClient) -> list[dict | str]:
            events = []
            async with http.stream("POST", "/completions", json=body | {"stream": True}) as response:
                assert response.status_code == 200
                async for line in response.aiter_lines():
                    if line.startswith("data: "):
                        data = line[len("data: "):]
                        events.append(data if data == "[DONE]" else json.loads(data))
            return events

        async def run() -> tuple[list[list[dict | str]], httpx.Response, float]:
            async with httpx.AsyncClient(base_url=server.v1, timeout=60) as http:
                streams = [asyncio.create_task(stream(http)) for _ in range(2)]
                whole = asyncio.create_task(http.post("/completions", json=body))
                await asyncio.wait_for(all_admitted(server, 3), 30)
                server._process.send_signal(signal.SIGTERM)
                sent = asyncio.get_running_loop().time()
                results = await asyncio.wait_for(asyncio.gather(*streams, whole), 30)
                return results[:2], results[2], asyncio.get_running_loop().time() - sent

        streams, whole, seconds = asyncio.run(run())
        assert server._process.wait(timeout=30) == 0
    assert 2 <= seconds < 2 + 8
    assert whole.status_code == 503, whole.text
    assert whole.json()["error"]["type"] == "service_unavailable"
    for events in streams:
        *chunks, error, done = events
        assert done == "[DONE]"
        assert error["error"]["type"] == "service_unavailable", error
        assert chunks and all(chunk["choices"][0]["finish_reason"] is None for chunk in chunks)


def test_hung_tensor_parallel_rank_hits_the_step_timeout_then_503s_and_the_server_exits_1(tiny_gpt2_dir):
    """A worker rank that stops answering (alive, asleep inside a step), not one that dies: rank 0's
    collectives give up after --tp-step-timeout, /health and every request turn 503, and the server, its
    engine core and the hung rank all exit (the server with status 1, for a restart)."""
    hang_token, step_timeout = 999, 2.0
    args = ["--model", f"tiny={tiny_gpt2_dir}", "--tensor-parallel-size", "2", "--dtype", "float32",
            "--kv-cache-tokens", "2048", "--tp-step-timeout", str(step_timeout)]
    with ServerProcess(args, env={"GPTSERVE_FAULT_HANG_TOKEN_ID": str(hang_token)}) as server:
        core, rank = core_pid(server), worker_pid(server)
        with httpx.Client(base_url=server.v1, timeout=60) as http:
            assert http.post("/completions", json=completion(PROMPT)).status_code == 200
            started = time.monotonic()
            hung = http.post("/completions", json=completion([*PROMPT, hang_token]))
            seconds = time.monotonic() - started
            after = http.post("/completions", json=completion(PROMPT))
        health = httpx.get(server.base_url + "/health", timeout=10)
        ready = httpx.get(server.base_url + "/ready", timeout=10)
        status = server._process.wait(timeout=30)
        log = server.log_text()
    assert status == 1
    assert exits_within(core, seconds=5) and exits_within(rank, seconds=5)
    assert hung.status_code == 503, hung.text
    assert step_timeout <= seconds < step_timeout + 10
    assert after.status_code == 503 and after.json()["error"]["type"] == "service_unavailable"
    assert health.status_code == 503 and ready.status_code == 503
    assert "tensor-parallel step failed" in log
