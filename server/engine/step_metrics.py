"""What the engine thread reports to Prometheus, translated from sequence timestamps into the metric calls.

Kept apart from the engine so the step logic reads without timing arithmetic; with no metrics sink
(offline use, unit tests) every call is a no-op.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from server.engine.engine_stats import EngineStats
from server.engine.sequence import Sequence

if TYPE_CHECKING:
    from server.metrics import ModelMetrics


class StepMetrics:
    def __init__(self, sink: ModelMetrics | None) -> None:
        self.sink = sink

    def preempted(self, count: int) -> None:
        if self.sink:
            for _ in range(count):
                self.sink.preempted()

    def interrupted(self) -> None:
        if self.sink:
            self.sink.step_interrupted()

    def prefix_cache(self, seq: Sequence) -> None:
        if self.sink:
            self.sink.prefix_cache(queried_tokens=seq.num_prompt_tokens, hit_tokens=seq.num_cached_tokens)

    def prompt_processed(self, seq: Sequence) -> None:
        """Its prompt is in (once, whatever preemptions recompute later)."""
        if self.sink:
            self.sink.prompt_processed(seq.num_prompt_tokens)

    def step(self, num_tokens: int) -> None:
        if self.sink:
            self.sink.step(num_tokens)

    def token(self, seq: Sequence, now: float) -> None:
        """Called before the sequence's timestamps move: the first token gives TTFT, later ones ITL."""
        if not self.sink:
            return
        if seq.last_token_time is None:  # the engine sets it together with first_token_time
            self.sink.first_token(now - seq.arrival_time)
        else:
            self.sink.inter_token(now - seq.last_token_time)

    def finished(self, seq: Sequence, now: float) -> None:
        if not self.sink:
            return
        scheduled = seq.first_scheduled_time or now
        first, last = seq.first_token_time or now, seq.last_token_time or now
        self.sink.request_finished(
            finished_reason=seq.finish_reason or "abort",
            prompt_tokens=seq.num_prompt_tokens,
            generation_tokens=seq.num_output_tokens,
            e2e=now - seq.arrival_time,
            queue=scheduled - seq.arrival_time,
            prefill=first - scheduled,
            decode=last - first,
        )

    def scheduler_state(self, stats: EngineStats) -> None:
        if self.sink:
            self.sink.scheduler_state(stats.running, stats.waiting, stats.kv_blocks_used, stats.kv_blocks_total)
