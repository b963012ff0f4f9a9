"""The engine core's metric calls, recorded where they happen and replayed into the front end's ModelMetrics.

The core has no Prometheus registry (the front end serves /metrics): it records each call StepMetrics makes as
a (method, arguments) pair, ships them with the step's outputs, and the front end makes the same calls.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from server.engine.core_messages import MetricEvent

if TYPE_CHECKING:
    from server.metrics import ModelMetrics

REPLAYED = frozenset({"scheduler_state", "step", "prefix_cache", "preempted", "step_interrupted", "first_token",
                      "inter_token", "request_finished"})


class MetricRecorder:
    """Stands in for ModelMetrics inside the core (same method names and arguments)."""

    def __init__(self) -> None:
        self.events: list[MetricEvent] = []

    def take(self) -> list[MetricEvent]:
        events, self.events = self.events, []
        return events

    def scheduler_state(self, running: int, waiting: int, kv_blocks_used: int, kv_blocks_total: int) -> None:
        self.events.append(("scheduler_state", (running, waiting, kv_blocks_used, kv_blocks_total)))

    def step(self, num_tokens: int) -> None:
        self.events.append(("step", (num_tokens,)))

    def prefix_cache(self, queried_tokens: int, hit_tokens: int) -> None:
        self.events.append(("prefix_cache", (queried_tokens, hit_tokens)))

    def preempted(self) -> None:
        self.events.append(("preempted", ()))

    def step_interrupted(self) -> None:
        self.events.append(("step_interrupted", ()))

    def first_token(self, seconds: float) -> None:
        self.events.append(("first_token", (seconds,)))

    def inter_token(self, seconds: float) -> None:
        self.events.append(("inter_token", (seconds,)))

    def request_finished(self, finished_reason: str, prompt_tokens: int, generation_tokens: int,
                         e2e: float, queue: float, prefill: float, decode: float) -> None:
        self.events.append(("request_finished", (finished_reason, prompt_tokens, generation_tokens, e2e, queue,
                                                 prefill, decode)))


def replay(events: list[MetricEvent], sink: ModelMetrics | None) -> None:
    if sink is None:
        return
    for name, args in events:
        if name in REPLAYED:  # never call what a message names unless it is one of these
            getattr(sink, name)(*args)
