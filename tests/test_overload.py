"""Overload: a burst of ten times what the server admits gets fast 429s with Retry-After, every admitted request
completes with the answer it gets alone, and the very next request after the burst is served."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from tests.server_process import ServerProcess

MAX_NUM_SEQS, MAX_QUEUE = 2, 2
CAPACITY = MAX_NUM_SEQS + MAX_QUEUE
BODY = {"model": "tiny", "prompt": "Overload me", "max_tokens": 40, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def server(tiny_gpt2_dir):
    args = ["--model", f"tiny={tiny_gpt2_dir}", "--max-num-seqs", str(MAX_NUM_SEQS), "--max-queue", str(MAX_QUEUE)]
    with ServerProcess(args) as running:
        yield running


async def timed_post(http: httpx.AsyncClient, body: dict) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = await http.post("/completions", json=body)
    return response, time.monotonic() - started


def test_burst_of_ten_times_capacity(server):
    alone = httpx.post(server.v1 + "/completions", json=BODY, timeout=60).json()["choices"][0]["text"]

    async def burst() -> tuple[list[tuple[httpx.Response, float]], httpx.Response]:
        limits = httpx.Limits(max_connections=10 * CAPACITY + 1)
        async with httpx.AsyncClient(base_url=server.v1, timeout=60, limits=limits) as http:
            results = await asyncio.gather(*(timed_post(http, BODY) for _ in range(10 * CAPACITY)))
            right_after = await http.post("/completions", json=BODY | {"max_tokens": 2})
        return results, right_after

    results, right_after = asyncio.run(burst())
    admitted = [r for r, _ in results if r.status_code == 200]
    rejected = [(r, seconds) for r, seconds in results if r.status_code == 429]
    assert len(admitted) + len(rejected) == len(results), [r.status_code for r, _ in results]
    assert CAPACITY <= len(admitted) < len(results) and rejected
    for response, seconds in rejected:
        assert response.headers["retry-after"] == "1"
        assert response.json()["error"]["type"] == "rate_limit_error"
        assert seconds < 10  # refused at the door, not after queueing
    assert all(r.json()["choices"][0]["text"] == alone for r in admitted)
    assert right_after.status_code == 200
    stats = server.health()["models"]["tiny"]
    assert (stats["running"], stats["waiting"], stats["kv_blocks_used"]) == (0, 0, 0)


def assert_refused_at_once(response: httpx.Response, seconds: float, status: int, param: str) -> None:
    assert response.status_code == status, response.text
    assert response.json()["error"]["param"] == param
    assert seconds < 5, f"refused only after {seconds:.1f}s: work was done before admission"


def timed(method, *args, **kwargs) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    return method(*args, timeout=120, **kwargs), time.monotonic() - started


def test_fan_out_that_can_never_be_admitted_is_a_400_before_any_work(server):
    """2 prompts x n=3 is 6 sequences against 4 places: retrying cannot help, so not a 429."""
    response, seconds = timed(httpx.post, server.v1 + "/completions", json=BODY | {"prompt": ["a", "b"], "n": 3})
    assert_refused_at_once(response, seconds, 400, "n")
    assert "can never be admitted" in response.json()["error"]["message"]


def test_thirty_thousand_prompts_times_n_128_are_refused_at_once(server):
    body = BODY | {"prompt": ["x"] * 30_000, "n": 128}
    response, seconds = timed(httpx.post, server.v1 + "/completions", json=body)
    assert_refused_at_once(response, seconds, 400, "prompt")
    response, seconds = timed(httpx.post, server.v1 + "/completions", json=body | {"prompt": ["x"] * 1000})
    assert_refused_at_once(response, seconds, 400, "n")


def test_perplexity_with_stride_one_over_a_long_text_is_refused_at_once(server):
    body = {"model": "tiny", "input": "word " * 80_000, "stride": 1}
    response, seconds = timed(httpx.post, server.v1 + "/perplexity", json=body)
    assert_refused_at_once(response, seconds, 400, "stride")
    assert "windows" in response.json()["error"]["message"]


def test_queue_counts_sequences_not_requests(server):
    """One request of n=4 takes all 4 places: the next single request is a 429."""
    long_body = BODY | {"max_tokens": 120, "n": 4, "temperature": 1.0}

    async def run() -> tuple[httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(base_url=server.v1, timeout=120) as http:
            holder = asyncio.create_task(http.post("/completions", json=long_body))
            while True:
                stats = (await asyncio.to_thread(server.health))["models"]["tiny"]
                if stats["running"] + stats["waiting"] == CAPACITY or holder.done():
                    break
                await asyncio.sleep(0.01)
            refused = await http.post("/completions", json=BODY | {"max_tokens": 1})
            return await holder, refused

    held, refused = asyncio.run(run())
    assert held.status_code == 200 and len(held.json()["choices"]) == 4
    assert refused.status_code == 429, refused.text
