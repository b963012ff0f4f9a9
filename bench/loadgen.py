"""Serving load generator for OpenAI-compatible servers (ours, llama.cpp's, vLLM's).

Each request is a streaming /v1/completions call with a prompt of ``--prompt-len`` random token ids and
exactly ``--output-len`` output tokens (``max_tokens`` + the ``ignore_eos`` / ``min_tokens`` extras).
Levels run one after another: closed loop at each ``--concurrency`` C (C clients, each sending its next
request when the last one finished; ``--ramp-up S`` spreads the clients' first requests evenly over S seconds
instead of sending all C at once), or open loop at each Poisson ``--request-rate`` R. How output tokens
are counted and what TTFT / TPOT / ITL mean: see ``bench.request``.

    python -m bench.loadgen --base-url http://127.0.0.1:8000 --prompt-len 128 --output-len 128 \
        --concurrency 1 4 16 64 --json-out results.json
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

import httpx

from bench.prompts import PromptSource
from bench.request import RequestResult, send_completion
from bench.stats import LevelReport


@dataclass(slots=True)
class BenchConfig:
    base_url: str = "http://127.0.0.1:8000"
    model: str | None = None
    prompt_len: int = 128
    output_len: int = 128
    concurrency: list[int] = field(default_factory=lambda: [1, 4, 16, 64])
    request_rate: list[float] | None = None
    num_requests: int | None = None
    duration: float | None = None
    shared_prefix_len: int = 0
    seed: int = 0
    vocab_size: int = 50257
    api_key: str | None = None
    timeout: float = 600.0
    warmup_requests: int = 1
    ramp_up: float = 0.0
    extra_body: dict = field(default_factory=dict)


DEFAULTS = BenchConfig()


class Bench:
    """One run: a client, a prompt source and the payload shape shared by every level."""

    def __init__(self, config: BenchConfig, client: httpx.AsyncClient, model: str) -> None:
        self.config = config
        self.client = client
        self.model = model
        self.url = config.base_url.rstrip("/") + "/v1/completions"
        self.headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
        self.prompts = PromptSource(config.prompt_len, config.vocab_size, config.seed, config.shared_prefix_len)
        self.arrivals = random.Random(f"arrivals-{config.seed}")

    def payload(self) -> dict:
        g = self.config.output_len
        return {
            "model": self.model,
            "prompt": self.prompts.next(),
            "max_tokens": g,
            "min_tokens": g,
            "ignore_eos": True,
            "temperature": 0.0,
            "stream": True,
            "stream_options": {"include_usage": True},
            **self.config.extra_body,
        }

    async def send(self) -> RequestResult:
        return await send_completion(self.client, self.url, self.payload(), self.headers)

    def request_limit(self, default: int) -> int | None:
        """Requests per level: --num-requests, else unbounded under --duration, else ``default``."""
        if self.config.num_requests is not None:
            return self.config.num_requests
        return None if self.config.duration is not None else default

    def deadline(self, start: float) -> float:
        return math.inf if self.config.duration is None else start + self.config.duration

    async def closed_loop(self, concurrency: int) -> LevelReport:
        limit = self.request_limit(max(2 * concurrency, 16))
        results: list[RequestResult] = []
        issued = 0
        start = time.perf_counter()
        deadline = self.deadline(start)

        async def client_loop(index: int) -> None:
            nonlocal issued
            # Independent clients are out of step; a burst of C prompts makes the last wait for all C prefills.
            await asyncio.sleep(self.config.ramp_up * index / concurrency)
            while (limit is None or issued < limit) and time.perf_counter() < deadline:
                issued += 1
                results.append(await self.send())

        await asyncio.gather(*(client_loop(i) for i in range(concurrency)))
        return LevelReport.build(results, time.perf_counter() - start, self.config.output_len, concurrency=concurrency)

    async def open_loop(self, rate: float) -> LevelReport:
        limit = self.request_limit(100)
        tasks: list[asyncio.Task[RequestResult]] = []
        start = time.perf_counter()
        deadline = self.deadline(start)
        send_at = start
        # Arrivals follow a fixed schedule, so a slow send never delays the ones after it.
        while (limit is None or len(tasks) < limit) and send_at < deadline:
            await asyncio.sleep(max(0.0, send_at - time.perf_counter()))
            tasks.append(asyncio.create_task(self.send()))
            send_at += self.arrivals.expovariate(rate) if math.isfinite(rate) else 0.0
        results = list(await asyncio.gather(*tasks))
        return LevelReport.build(results, time.perf_counter() - start, self.config.output_len, request_rate=rate)

    async def warm_up(self) -> None:
        for _ in range(self.config.warmup_requests):
            result = await self.send()
            if not result.ok:
                raise RuntimeError(f"warm-up request failed ({result.error}); is {self.url} serving {self.model}?")

    async def run_levels(self) -> list[LevelReport]:
        await self.warm_up()
        if self.config.request_rate is not None:
            return [await self.open_loop(rate) for rate in self.config.request_rate]
        return [await self.closed_loop(c) for c in self.config.concurrency]


async def first_model(client: httpx.AsyncClient, config: BenchConfig) -> str:
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    response = await client.get(config.base_url.rstrip("/") + "/v1/models", headers=headers)
    response.raise_for_status()
    return response.json()["data"][0]["id"]


async def run_benchmark(config: BenchConfig) -> dict:
    """Run every level and return the JSON-ready report: the config, the model and one entry per level."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=httpx.Timeout(config.timeout), limits=limits) as client:
        model = config.model or await first_model(client, config)
        levels = await Bench(config, client, model).run_levels()
    settings = {k: v for k, v in asdict(config).items() if k != "api_key"}
    return {"model": model, "config": settings, "levels": [asdict(level) for level in levels]}


def level_label(level: dict) -> str:
    return f"C={level['concurrency']}" if level["mode"] == "closed" else f"R={level['request_rate']:g}/s"


def format_table(report: dict) -> str:
    """A short text table: one row per level, latencies in ms."""
    head = ("level", "ok", "fail", "req/s", "out tok/s", "tot tok/s", "TTFT p50", "TTFT p99",
            "TPOT p50", "ITL p50", "ITL p99", "e2e p50")
    rows = [head]
    for level in report["levels"]:
        ms = [level["ttft_ms"]["p50"], level["ttft_ms"]["p99"], level["tpot_ms"]["p50"],
              level["itl_ms"]["p50"], level["itl_ms"]["p99"], level["e2e_ms"]["p50"]]
        rows.append((level_label(level), str(level["completed"]), str(level["failed"]),
                     f"{level['request_throughput']:.2f}", f"{level['output_throughput']:.1f}",
                     f"{level['total_token_throughput']:.1f}",
                     *("-" if v is None else f"{v:.1f}" for v in ms)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows]
    for level in report["levels"]:
        if level["errors"]:
            lines.append(f"errors at {level_label(level)}: {level['errors']}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> tuple[BenchConfig, str | None]:
    p = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default=DEFAULTS.base_url)
    p.add_argument("--model", help="served model id (default: the first of GET /v1/models)")
    p.add_argument("--prompt-len", type=int, default=DEFAULTS.prompt_len, help="prompt tokens per request")
    p.add_argument("--output-len", type=int, default=DEFAULTS.output_len, help="output tokens per request")
    p.add_argument("--concurrency", type=int, nargs="+", default=DEFAULTS.concurrency, help="closed-loop levels")
    p.add_argument("--ramp-up", type=float, default=0.0,
                   help="closed loop: seconds over which the C clients' first requests are spread evenly "
                        "(default 0: all at once)")
    p.add_argument("--request-rate", type=float, nargs="+",
                   help="open-loop Poisson levels in requests/s ('inf': all at once); replaces --concurrency")
    p.add_argument("--num-requests", type=int,
                   help="requests per level (default: max(2C, 16) closed, 100 open; unbounded with --duration)")
    p.add_argument("--duration", type=float, help="seconds per level to keep sending (in-flight ones finish)")
    p.add_argument("--shared-prefix-len", type=int, default=0, help="leading prompt tokens shared by all requests")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab-size", type=int, default=DEFAULTS.vocab_size, help="prompt token ids are below this")
    p.add_argument("--api-key")
    p.add_argument("--timeout", type=float, default=DEFAULTS.timeout,
                   help="seconds to wait for a connection or for more of a reply")
    p.add_argument("--warmup-requests", type=int, default=1, help="unmeasured requests before the first level")
    p.add_argument("--extra-body", type=json.loads, default={},
                   help='JSON merged into every request body, e.g. \'{"n_predict": 128}\'')
    p.add_argument("--json-out", help="write the full report here")
    args = p.parse_args(argv)
    rates = args.request_rate
    if rates and any(math.isinf(r) for r in rates) and args.num_requests is None:
        p.error("--request-rate inf needs --num-requests")
    if not 0 <= args.shared_prefix_len <= args.prompt_len:
        p.error("--shared-prefix-len must be between 0 and --prompt-len")
    json_out = args.json_out
    fields = vars(args)
    del fields["json_out"]
    return BenchConfig(**fields), json_out


def main(argv: list[str] | None = None) -> int:
    """Exit status 1 when any measured request failed, so a smoke run in CI can rely on it."""
    config, json_out = parse_args(argv)
    try:
        report = asyncio.run(run_benchmark(config))
    except (RuntimeError, httpx.HTTPError) as exc:
        print(f"loadgen: {exc}", file=sys.stderr)
        return 2
    print(f"model {report['model']}: prompt {config.prompt_len} tokens, output {config.output_len} tokens")
    print(format_table(report))
    if json_out:
        with open(json_out, "w") as f:
            json.dump(report, f, indent=2)
    return 1 if any(level["failed"] for level in report["levels"]) else 0


if __name__ == "__main__":
    sys.exit(main())
