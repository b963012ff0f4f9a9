"""KV exhaustion: with a cache far smaller than the load, preemption keeps every greedy answer equal to the
answer alone and every request completes; a request that could never fit the cache is refused at once."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from tests.server_process import ServerProcess

KV_TOKENS = 96  # 6 blocks of 16: two of the requests below fill it
PROMPTS = [f"Request number {i} says" for i in range(12)]


@pytest.fixture(scope="module")
def server(tiny_gpt2_dir):
    args = ["--model", f"tiny={tiny_gpt2_dir}", "--kv-cache-tokens", str(KV_TOKENS), "--block-size", "16",
            "--max-num-seqs", "8"]
    with ServerProcess(args) as running:
        yield running


def body(prompt: str, **fields) -> dict:
    return {"model": "tiny", "prompt": prompt, "max_tokens": 40, "temperature": 0, "ignore_eos": True} | fields


def test_preemption_keeps_every_answer_exact(server):
    with httpx.Client(base_url=server.v1, timeout=120) as http:
        alone = [http.post("/completions", json=body(p)).json()["choices"][0]["text"] for p in PROMPTS]

    async def together() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.v1, timeout=120) as http:
            return await asyncio.gather(*(http.post("/completions", json=body(p, stream=False)) for p in PROMPTS))

    responses = asyncio.run(together())
    assert [r.status_code for r in responses] == [200] * len(PROMPTS)
    assert [r.json()["choices"][0]["text"] for r in responses] == alone
    assert all(r.json()["usage"]["completion_tokens"] == 40 for r in responses)
    stats = server.health()["models"]["tiny"]
    assert stats["num_preemptions"] > 0, "the load did not exhaust the cache"
    assert (stats["running"], stats["waiting"], stats["kv_blocks_used"]) == (0, 0, 0)


def test_request_that_can_never_fit_is_refused_at_once(server):
    started = time.monotonic()
    response = httpx.post(server.v1 + "/completions", json=body("x", max_tokens=KV_TOKENS + 10), timeout=30)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "max_tokens"
    assert "KV cache" in response.json()["error"]["message"]
    assert time.monotonic() - started < 10
    assert server.health()["models"]["tiny"]["kv_blocks_used"] == 0


def test_a_request_without_max_tokens_gets_what_the_cache_holds(server):
    """The cache (96 tokens) is smaller than the context (128): leaving max_tokens out must not mean 'never fits'."""
    completion = httpx.post(server.v1 + "/completions", json=body("x", max_tokens=None, n=2), timeout=60)
    assert completion.status_code == 200, completion.text
    assert all(c["finish_reason"] in ("stop", "length") for c in completion.json()["choices"])
    assert completion.json()["usage"]["completion_tokens"] == 2 * 47  # 3 blocks of 16 each, less the prompt
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": 0}
    response = httpx.post(server.v1 + "/chat/completions", json=chat, timeout=60)
    assert response.status_code == 200, response.text


def test_n_choices_that_cannot_fit_together_are_refused_naming_n(server):
    response = httpx.post(server.v1 + "/completions", json=body("x", n=4), timeout=30)  # 4 x 3 blocks of the 6
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "n"
