"""Soak under mixed load: ``python -m bench.soak --duration 60 --clients 64 [--model DIR | --url URL --pid PID]``.

Concurrent clients send a mix of streaming and non-streaming completions, chat, perplexity, embeddings, n > 1
(greedy and seeded), stop strings and token-id prompts; about one client in five drops its stream midway. Every
request's answer is computed once up front, alone on the idle server, and every greedy answer under load must
equal it (perplexity to 1e-4, embeddings each value to 1e-4, sampled choices in shape). At the end the server
must be idle with no KV block held, its RSS must not have grown by more than 5% from the first window to the
last, and the only errors allowed are 429s (the client waits Retry-After's second and goes on). RSS is sampled
only after ``--warmup`` seconds of the same load: a fresh server's RSS climbs through its first tens of seconds
of load (allocator arenas, first-use paths) and then levels off, which a 60-second run would otherwise read as
growth.
Prints a JSON report; exits 1 if a check failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

PROMPTS = ["The quick brown fox", "Once upon a time", "In the beginning", "Hello, my name is",
           "The meaning of life is", "Paris is the capital of"]
MAX_RSS_GROWTH = 0.05


@dataclass(frozen=True)
class Job:
    """One request of the mix and how to compare its answer: the whole body, or one number for perplexity."""

    kind: str
    path: str
    body: dict


def build_jobs(model: str) -> list[Job]:
    jobs = []
    for i, text in enumerate(PROMPTS):
        base = {"model": model, "max_tokens": 12 + i, "temperature": 0}
        jobs += [
            Job("completion", "/v1/completions", base | {"prompt": text}),
            Job("completion-stream", "/v1/completions", base | {"prompt": text, "stream": True}),
            Job("chat", "/v1/chat/completions", base | {"messages": [{"role": "user", "content": text}]}),
            Job("chat-stream", "/v1/chat/completions",
                base | {"messages": [{"role": "user", "content": text}], "stream": True}),
            Job("perplexity", "/v1/perplexity", {"model": model, "input": [text, text + " and more"]}),
            Job("embeddings", "/v1/embeddings", {"model": model, "input": [text, text + " and more"]}),
            Job("n-greedy", "/v1/completions", base | {"prompt": text, "n": 2}),
            Job("n-sampled", "/v1/completions", base | {"prompt": text, "n": 3, "temperature": 1.0, "seed": i}),
            Job("stop", "/v1/completions", base | {"prompt": text, "stop": [" the", "e"], "max_tokens": 24}),
            Job("token-ids", "/v1/completions", base | {"prompt": [464 + i, 2068, 7586, 21831, 11]}),
        ]
    return jobs


@dataclass
class Tally:
    completed: int = 0
    disconnected: int = 0
    rejected_429: int = 0
    mismatches: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    by_kind: dict[str, int] = field(default_factory=dict)


async def answer(http: httpx.AsyncClient, job: Job, drop_after: int | None = None) -> tuple[int, object]:
    """(status, comparable answer); for a dropped stream (status, None) once ``drop_after`` events came."""
    if not job.body.get("stream"):
        response = await http.post(job.path, json=job.body)
        if response.status_code != 200:
            return response.status_code, response.text
        return 200, comparable(job, response.json())
    async with http.stream("POST", job.path, json=job.body) as response:
        if response.status_code != 200:
            return response.status_code, (await response.aread()).decode()
        events = []
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                return 200, merge_stream(job, events)
            events.append(json.loads(line[len("data: "):]))
            if drop_after is not None and len(events) >= drop_after:
                return 200, None  # leaving the block closes the connection mid-stream
    return 200, "stream ended without [DONE]"


def comparable(job: Job, body: dict) -> object:
    if job.kind == "perplexity":
        return [item["perplexity"] for item in body["data"]]
    if job.kind == "embeddings":
        return [item["embedding"] for item in body["data"]]
    if job.kind == "n-sampled":  # sampled text may differ with the batch's float noise; its shape may not
        return [(c["index"], c["finish_reason"], len(c["text"]) > 0) for c in body["choices"]]
    if "message" in body["choices"][0]:
        return [(c["message"]["content"], c["finish_reason"]) for c in body["choices"]]
    return [(c["text"], c["finish_reason"]) for c in body["choices"]]


def same(job: Job, got: object, expected: object) -> bool:
    if job.kind == "perplexity" and isinstance(got, list):  # batch composition moves float sums' last digits
        return len(got) == len(expected) and all(math.isclose(a, b, rel_tol=1e-4) for a, b in zip(got, expected))
    if job.kind == "embeddings" and isinstance(got, list):  # unit vectors: each value to 1e-4
        return len(got) == len(expected) and all(
            len(a) == len(b) and all(math.isclose(x, y, abs_tol=1e-4) for x, y in zip(a, b))
            for a, b in zip(got, expected))
    return got == expected


def merge_stream(job: Job, events: list[dict]) -> object:
    if any("error" in event for event in events):
        return f"error event: {events[-1]}"
    texts: dict[int, str] = {}
    finish: dict[int, str] = {}
    for event in events:
        for choice in event["choices"]:
            piece = choice["delta"].get("content") if "delta" in choice else choice["text"]
            texts[choice["index"]] = texts.get(choice["index"], "") + (piece or "")
            if choice["finish_reason"] is not None:
                finish[choice["index"]] = choice["finish_reason"]
    return [(texts[i], finish.get(i)) for i in sorted(texts)]


async def client(index: int, http: httpx.AsyncClient, jobs: list[Job], expected: list[object], deadline: float,
                 dropper: bool, tally: Tally) -> None:
    rng = random.Random(index)
    while time.monotonic() < deadline:
        job_index = rng.randrange(len(jobs))
        job = jobs[job_index]
        drop_after = rng.randint(1, 3) if dropper and job.body.get("stream") else None
        try:
            status, got = await answer(http, job, drop_after)
        except httpx.HTTPError as e:
            tally.errors.append(f"{job.kind}: {type(e).__name__}: {e}")
            continue
        if status == 429:
            tally.rejected_429 += 1
            await asyncio.sleep(1.0)  # the Retry-After the server sends
        elif status != 200:
            tally.errors.append(f"{job.kind}: HTTP {status}: {str(got)[:200]}")
        elif got is None:
            tally.disconnected += 1
        elif not same(job, got, expected[job_index]):
            tally.mismatches.append(f"{job.kind} {job.body}: got {got!r}, alone {expected[job_index]!r}")
        else:
            tally.completed += 1
            tally.by_kind[job.kind] = tally.by_kind.get(job.kind, 0) + 1


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


async def sample_rss(pid: int, samples: list[tuple[float, int]], stop: asyncio.Event, start_at: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), max(0.0, start_at - time.monotonic()))
    except TimeoutError:
        pass
    while not stop.is_set():
        samples.append((time.monotonic(), rss_bytes(pid)))
        try:
            await asyncio.wait_for(stop.wait(), 1.0)
        except TimeoutError:
            pass


def rss_growth(samples: list[tuple[float, int]], window: float) -> tuple[float, float, float]:
    """(median RSS of the first window, of the last window, relative growth)."""
    start, end = samples[0][0], samples[-1][0]
    first = sorted(rss for t, rss in samples if t - start <= window)
    last = sorted(rss for t, rss in samples if end - t <= window)
    first_median, last_median = first[len(first) // 2], last[len(last) // 2]
    return first_median, last_median, last_median / first_median - 1


async def idle_stats(http: httpx.AsyncClient, model: str, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        stats = (await http.get("/health")).json()["models"][model]
        if (stats["running"] == 0 and stats["waiting"] == 0) or time.monotonic() > deadline:
            return stats
        await asyncio.sleep(0.1)


@dataclass
class SoakReport:
    duration_s: float
    clients: int
    tally: Tally
    expected_kinds: int
    final_stats: dict
    rss_first_mb: float | None
    rss_last_mb: float | None
    rss_growth: float | None
    failures: list[str]

    @property
    def ok(self) -> bool:
        return not self.failures


async def run_soak(base_url: str, model: str, duration: float, clients: int, pid: int | None = None,
                   drop_fraction: float = 0.2, warmup: float = 30.0) -> SoakReport:
    """``warmup`` seconds of load, then ``duration`` seconds more over which RSS is sampled."""
    limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8)
    async with httpx.AsyncClient(base_url=base_url, timeout=120, limits=limits) as http:
        jobs = build_jobs(model)
        expected = []
        for job in jobs:  # alone on the idle server: the answer every loaded run must reproduce
            status, got = await answer(http, job)
            if status != 200:
                raise RuntimeError(f"{job.kind} failed alone: HTTP {status}: {got}")
            expected.append(got)
        tally, samples, stop = Tally(), [], asyncio.Event()
        started = time.monotonic()
        sampler = asyncio.create_task(sample_rss(pid, samples, stop, started + warmup)) if pid else None
        droppers = round(clients * drop_fraction)
        await asyncio.gather(*(client(i, http, jobs, expected, started + warmup + duration, i < droppers, tally)
                               for i in range(clients)))
        elapsed = time.monotonic() - started
        stats = await idle_stats(http, model)
        stop.set()
        if sampler:
            await sampler
    window = min(60.0, (elapsed - warmup) / 3)
    first, last, growth = rss_growth(samples, window) if samples else (None, None, None)
    failures = [f"{len(tally.mismatches)} answers differ from the single-request answer"] if tally.mismatches else []
    failures += [f"{len(tally.errors)} errors other than 429"] if tally.errors else []
    failures += [f"engine not clean after the load: {stats}"] if (stats["running"], stats["waiting"],
                                                                   stats["kv_blocks_used"]) != (0, 0, 0) else []
    failures += [f"RSS grew {growth:.1%}"] if growth is not None and growth > MAX_RSS_GROWTH else []
    failures += ["no stream was dropped midway"] if droppers and not tally.disconnected else []
    failures += [f"no completed {kind}" for kind in {j.kind for j in jobs} if not tally.by_kind.get(kind)]

    def mb(b: float | None) -> float | None:
        return None if b is None else round(b / 2**20, 1)

    return SoakReport(round(elapsed, 1), clients, tally, len({j.kind for j in jobs}), stats, mb(first), mb(last),
                      None if growth is None else round(growth, 4), failures)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load after the warm-up")
    parser.add_argument("--warmup", type=float, default=30.0, help="seconds of load before RSS is sampled")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--url", help="a running server (default: start one with --model)")
    parser.add_argument("--pid", type=int, help="with --url: the server's pid, for the RSS check")
    parser.add_argument("--model", help="checkpoint directory to serve (default: a tiny random GPT-2)")
    parser.add_argument("--served-name", default="soak", help="the model name requests use")
    parser.add_argument("--server-arg", action="append", default=[], help="extra flag for the started server")
    args = parser.parse_args(argv)
    if args.url:
        report = asyncio.run(run_soak(args.url, args.served_name, args.duration, args.clients, args.pid,
                                      warmup=args.warmup))
    else:
        report = soak_own_server(args)
    print(json.dumps(asdict(report) | {"ok": report.ok}, indent=2))
    return 0 if report.ok else 1


def soak_own_server(args: argparse.Namespace) -> SoakReport:
    import tempfile

    from tests.server_process import ServerProcess  # the launcher the test suite uses

    model = args.model
    with tempfile.TemporaryDirectory() as tmp:
        if model is None:
            from models.testing.gpt2_checkpoint import write_tiny_gpt2

            model = str(write_tiny_gpt2(Path(tmp) / "gpt2"))
        server_args = ["--model", f"{args.served_name}={model}", "--max-num-seqs", "16", "--max-queue", "32",
                       *args.server_arg]
        with ServerProcess(server_args) as server:
            return asyncio.run(run_soak(server.base_url, args.served_name, args.duration, args.clients,
                                        server._process.pid, warmup=args.warmup))


if __name__ == "__main__":
    sys.exit(main())
