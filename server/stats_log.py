"""A log line per served model every few seconds while it works, as vLLM's engine logs one (``--disable-log-stats``
turns it off): prompt and generation throughput, requests running and waiting, KV cache use, prefix cache hits.

It reads what /metrics serves, so the two agree: tokens from the Prometheus counters (prompt tokens are counted as
each prefill completes, as vLLM counts them), queues and KV blocks from the engine core's last report. A model
that was idle for a whole interval logs nothing more until it works again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from time import monotonic
from typing import Protocol

from server.engine.engine_stats import EngineStats
from server.metrics import Metrics

log = logging.getLogger("gptserve")

COUNTERS = {"prompt_tokens": "gptserve:prompt_tokens_total", "generation_tokens": "gptserve:generation_tokens_total",
            "cache_queries": "gptserve:prefix_cache_queries_total", "cache_hits": "gptserve:prefix_cache_hits_total"}


@dataclass(frozen=True)
class Totals:
    """One model's counters at one moment."""

    prompt_tokens: float
    generation_tokens: float
    cache_queries: float
    cache_hits: float

    def since(self, before: Totals) -> Totals:
        return Totals(*(now - then for now, then in zip(vars(self).values(), vars(before).values(), strict=True)))


class ReportsStats(Protocol):
    """What the log asks of an engine: EngineCoreClient's view of its core's queues and KV pool."""

    def stats(self) -> EngineStats: ...


class StatsLog:
    def __init__(self, metrics: Metrics, engines: dict[str, ReportsStats], interval: float,
                 clock: Callable[[], float] = monotonic) -> None:
        self._metrics = metrics
        self._clock = clock
        self._engines = engines
        self._interval = interval
        self._last: dict[str, tuple[float, Totals, bool]] = {}  # model -> (when, its totals, whether it was busy)

    async def run(self) -> None:
        self.take_readings()
        while True:
            await asyncio.sleep(self._interval)
            self.take_readings()

    def take_readings(self) -> None:
        """Log each model that worked since the last reading, or was working then."""
        self._metrics.flush()
        now = self._clock()
        for name, engine in self._engines.items():
            totals = Totals(*(self._metrics.registry.get_sample_value(metric, {"model_name": name}) or 0.0
                              for metric in COUNTERS.values()))
            stats = engine.stats()
            previous = self._last.get(name)
            busy = bool(stats.running or stats.waiting)
            if previous is not None:
                then, before, was_busy = previous
                delta = totals.since(before)
                busy = busy or delta.prompt_tokens > 0 or delta.generation_tokens > 0
                if busy or was_busy:
                    _log_line(name, now - then, delta, stats)
            self._last[name] = (now, totals, busy)


def _log_line(model: str, seconds: float, delta: Totals, stats: EngineStats) -> None:
    prompt_rate = delta.prompt_tokens / seconds
    generation_rate = delta.generation_tokens / seconds
    kv_usage = 100.0 * stats.kv_blocks_used / stats.kv_blocks_total if stats.kv_blocks_total else 0.0
    hit_rate = 100.0 * delta.cache_hits / delta.cache_queries if delta.cache_queries else 0.0
    log.info(f"Avg prompt throughput: {prompt_rate:.1f} tokens/s, Avg generation throughput: {generation_rate:.1f} "
             f"tokens/s, Running: {stats.running} reqs, Waiting: {stats.waiting} reqs, KV cache usage: "
             f"{kv_usage:.1f}%, Prefix cache hit rate: {hit_rate:.1f}%",
             extra={"model": model, "prompt_throughput": round(prompt_rate, 3),
                    "generation_throughput": round(generation_rate, 3), "running": stats.running,
                    "waiting": stats.waiting, "kv_cache_usage_perc": round(kv_usage, 3),
                    "prefix_cache_hit_rate_perc": round(hit_rate, 3), "preemptions": stats.num_preemptions})
