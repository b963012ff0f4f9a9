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
