"""The engine core's metric calls, recorded where they happen and replayed into the front end's ModelMetrics.

The core has no Prometheus registry (the front end serves /metrics): it records each call StepMetrics makes as
a (method, arguments) pair, ships them with the step's outputs, and the front end makes the same calls. It makes
them in batches (MetricBacklog): a few locked Prometheus updates a step, on caches the engine core's step has
just flushed, were a noticeable share of the front end's CPU per streamed token (bench/NOTES.md, session 12).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from server.engine.core_messages import MetricEvent

if TYPE_CHECKING:
    from server.metrics import ModelMetrics

MAX_BACKLOG_EVENTS = 4096  # replayed at once when this many wait (about 1,400 tokens at C=1) and no scrape came

REPLAYED = frozenset({"scheduler_state", "step", "prefix_cache", "preempted", "step_interrupted", "prompt_processed",
                      "first_token", "inter_token", "request_finished"})


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

    def prompt_processed(self, prompt_tokens: int) -> None:
        self.events.append(("prompt_processed", (prompt_tokens,)))

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


class MetricBacklog:
    """The core's metric calls as they arrive, replayed when /metrics is read (``flush``, which the app calls
    before every exposition) or once MAX_BACKLOG_EVENTS wait. Of the gauge updates only the last is made: no scrape
    can fall between two of them."""

    def __init__(self, sink: ModelMetrics | None) -> None:
        self.sink = sink
        self._batches: list[list[MetricEvent]] = []
        self._count = 0

    def add(self, events: list[MetricEvent]) -> None:
        if self.sink is None or not events:
            return
        self._batches.append(events)
        self._count += len(events)
        if self._count >= MAX_BACKLOG_EVENTS:
            self.flush()

    def flush(self) -> None:
        batches, self._batches, self._count = self._batches, [], 0
        events = [event for batch in batches for event in batch if event[0] != "scheduler_state"]
        last_state = next((event for batch in reversed(batches) for event in reversed(batch)
                           if event[0] == "scheduler_state"), None)
        replay(events if last_state is None else [*events, last_state], self.sink)
