"""The load generator against a fake streaming OpenAI server on loopback: reports are complete and consistent."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from bench.loadgen import BenchConfig, run_benchmark
from bench.prompts import PromptSource

MODEL = "fake-gpt2"
CHUNK_DELAY_S = 0.002


def fake_openai_app() -> FastAPI:
    """Streams one chunk per requested token; extra body keys ``fail`` (429) and ``omit_usage`` steer it."""
    app = FastAPI()

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": MODEL, "object": "model"}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        if body.get("fail"):
            return JSONResponse({"error": {"message": "queue full", "type": "overloaded"}}, status_code=429)
        tokens = body["max_tokens"]
        usage = {"prompt_tokens": len(body["prompt"]), "completion_tokens": tokens,
                 "total_tokens": len(body["prompt"]) + tokens}
        send_usage = body.get("stream_options", {}).get("include_usage") and not body.get("omit_usage")

        async def events():
            for i in range(tokens):
                await asyncio.sleep(CHUNK_DELAY_S)
                finish = "length" if i == tokens - 1 else None
                chunk = {"object": "text_completion", "model": MODEL,
                         "choices": [{"index": 0, "text": f" t{i}", "finish_reason": finish}]}
                yield f"data: {json.dumps(chunk)}\n\n"
            if send_usage:
                yield f"data: {json.dumps({'object': 'text_completion', 'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    # proto=IPPROTO_TCP lets asyncio set TCP_NODELAY on accepted connections; without it Nagle's algorithm
    # holds the stream's small chunks back for the client's delayed ACK (~40 ms).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(fake_openai_app(), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("fake server did not start")
        threading.Event().wait(0.01)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join(10)
    sock.close()


def check_level(level: dict, requests: int, prompt_len: int, output_len: int) -> None:
    assert level["completed"] == requests and level["failed"] == 0 and level["errors"] == {}
    assert level["output_len_mismatch"] == 0
    assert level["total_output_tokens"] == requests * output_len
    assert level["total_input_tokens"] == requests * prompt_len
    assert level["output_throughput"] == pytest.approx(level["request_throughput"] * output_len)
    for name in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        d = level[name]
        assert 0 < d["p50"] <= d["p90"] <= d["p99"], name
    assert level["ttft_ms"]["p99"] < level["e2e_ms"]["p99"]
    assert level["ttft_ms"]["mean"] < level["e2e_ms"]["mean"]


def test_cli_closed_loop_levels_write_a_consistent_json_report(base_url: str, tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "bench.loadgen", "--base-url", base_url, "--prompt-len", "16",
           "--output-len", "8", "--concurrency", "1", "4", "--num-requests", "12", "--json-out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=Path(__file__).parents[1])
    assert proc.returncode == 0, proc.stderr
    assert "C=1" in proc.stdout and "C=4" in proc.stdout
    report = json.loads(out.read_text())
    assert report["model"] == MODEL
    assert [(lv["mode"], lv["concurrency"]) for lv in report["levels"]] == [("closed", 1), ("closed", 4)]
    for level in report["levels"]:
        check_level(level, requests=12, prompt_len=16, output_len=8)


@pytest.mark.parametrize("omit_usage", [False, True], ids=["usage", "counted_chunks"])
def test_poisson_level_by_duration_counts_every_output_token(base_url: str, omit_usage: bool) -> None:
    config = BenchConfig(base_url=base_url, prompt_len=8, output_len=6, request_rate=[40.0], duration=1.0,
                         extra_body={"omit_usage": True} if omit_usage else {})
    (level,) = asyncio.run(run_benchmark(config))["levels"]
    assert level["mode"] == "poisson" and level["request_rate"] == 40.0
    check_level(level, requests=level["completed"], prompt_len=8, output_len=6)
    assert level["completed"] > 0


def test_ramp_up_spreads_the_clients_first_requests(base_url: str) -> None:
    """4 clients over 0.8 s: the last starts 0.6 s in, so the level lasts that long though each request is short."""
    config = BenchConfig(base_url=base_url, prompt_len=8, output_len=4, concurrency=[4], num_requests=4,
                         warmup_requests=0, ramp_up=0.8)
    (level,) = asyncio.run(run_benchmark(config))["levels"]
    check_level(level, requests=4, prompt_len=8, output_len=4)
    assert 0.6 <= level["duration_s"] < 0.6 + 4 * 4 * CHUNK_DELAY_S + 0.5
    assert level["ttft_ms"]["p99"] < 300  # nobody queued behind the others


def test_rejected_requests_are_counted_by_status(base_url: str) -> None:
    config = BenchConfig(base_url=base_url, concurrency=[2], num_requests=5, warmup_requests=0,
                         extra_body={"fail": True})
    (level,) = asyncio.run(run_benchmark(config))["levels"]
    assert level["completed"] == 0 and level["failed"] == 5
    assert level["errors"] == {"http_429": 5}
    assert level["ttft_ms"]["p50"] is None and level["output_throughput"] == 0


def test_prompts_are_seeded_fresh_and_share_only_the_requested_prefix() -> None:
    first = PromptSource(32, 100, seed=7, shared_prefix_len=10)
    again = PromptSource(32, 100, seed=7, shared_prefix_len=10)
    prompts = [first.next() for _ in range(4)]
    assert prompts == [again.next() for _ in range(4)]
    assert all(len(p) == 32 and p[:10] == prompts[0][:10] and max(p) < 100 for p in prompts)
    assert len({tuple(p[10:]) for p in prompts}) == 4
