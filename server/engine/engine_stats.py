"""A snapshot of the engine's queues and KV pool, for /health and the scheduler gauges in /metrics.

Its own module so that the step metrics below the engine can name it without importing the engine.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class EngineStats:
    running: int
    waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    num_preemptions: int
