"""Single requests sent to two servers in turn, in pairs: a C=1 comparison that the machine's drift cannot decide.

This machine's memory bandwidth moves between ~34 and ~56 GB/s within minutes (bench/NOTES.md, session 13),
and a batch-1 decode is bound by it, so one server measured after the other can win or lose by the minute it
ran in. Here both servers are up at once and take one request each in turn (ABBA: pair i's second request
goes first in pair i+1), each pair on the same prompt, so a pair's two requests run seconds apart and its
ratio is what the servers differ by. Reported per server: medians of output tok/s (a request's output tokens
over its end-to-end time), TTFT and TPOT; and over the pairs: the median ratio of the first server's tok/s to
the second's, how many pairs the first won, and the two-sided sign test's p-value for "neither is faster".
Idle, each server sleeps (llama.cpp between requests; gptserve's core blocks on its socket), so the one
serving has the CPU to itself.
"""

from __future__ import annotations

import asyncio
import math
import statistics
from dataclasses import dataclass, replace

import httpx

from bench.loadgen import Bench, BenchConfig, first_model
from bench.request import RequestResult


@dataclass(slots=True)
class PairedRun:
    """Each server's results, in the order the pairs were sent (``names[0]`` is the one the ratios put first)."""

    names: tuple[str, str]
    results: dict[str, list[RequestResult]]


async def run_pairs(urls: dict[str, str], config: BenchConfig, pairs: int) -> PairedRun:
    """``pairs`` requests to each of the two servers in ``urls`` (name -> base URL), alternated ABBA."""
    if len(urls) != 2:
        raise ValueError("a paired run compares two servers")
    names = tuple(urls)
    # a fresh loopback connection a request: llama.cpp's server drops one left idle while the other serves
    limits = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=httpx.Timeout(config.timeout), limits=limits) as client:
        benches = {}
        for name, url in urls.items():  # one Bench each, same seed: pair i sends both the same prompt
            server_config = replace(config, base_url=url)
            benches[name] = Bench(server_config, client, await first_model(client, server_config))
            await benches[name].warm_up()
        results: dict[str, list[RequestResult]] = {name: [] for name in names}
        for i in range(pairs):
            for name in names if i % 2 == 0 else names[::-1]:
                result = await benches[name].send()
                if not result.ok:
                    raise RuntimeError(f"{name}: request failed ({result.error})")
                results[name].append(result)
    return PairedRun((names[0], names[1]), results)


def tok_s(result: RequestResult) -> float:
    return result.output_tokens / result.e2e


def sign_test_p(wins: int, trials: int) -> float:
    """Two-sided p-value of ``wins`` of ``trials`` under a fair coin (the exact binomial sum)."""
    tail = min(wins, trials - wins)
    p = 2 * sum(math.comb(trials, k) for k in range(tail + 1)) / 2**trials
    return min(1.0, p)


def paired_table(run: PairedRun) -> str:
    """One row per server (medians), then one line on the pairs."""
    lines = ["| server | requests | out tok/s | TTFT ms | TPOT ms |", "|---|---|---|---|---|"]
    for name in run.names:
        results = run.results[name]
        tpots = [r.tpot for r in results if r.tpot is not None]
        lines.append(f"| {name} | {len(results)} | {statistics.median(map(tok_s, results)):.1f} | "
                     f"{1e3 * statistics.median(r.ttft for r in results):.1f} | "
                     f"{1e3 * statistics.median(tpots):.2f} |")
    first, second = (run.results[name] for name in run.names)
    ratios = [tok_s(a) / tok_s(b) for a, b in zip(first, second)]
    wins = sum(ratio > 1 for ratio in ratios)
    lines.append(f"\n{run.names[0]} / {run.names[1]} out tok/s over {len(ratios)} pairs: median "
                 f"{statistics.median(ratios):.3f} (range {min(ratios):.3f}-{max(ratios):.3f}); {run.names[0]} "
                 f"faster in {wins} of {len(ratios)}, sign test p = {sign_test_p(wins, len(ratios)):.2g}")
    return "\n".join(lines)


def paired(urls: dict[str, str], config: BenchConfig, pairs: int) -> str:
    """``run_pairs`` and its table."""
    return paired_table(asyncio.run(run_pairs(urls, config, pairs)))
