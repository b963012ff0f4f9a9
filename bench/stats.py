"""Summaries of per-request measurements: percentiles and the per-level report."""

from __future__ import annotations

from dataclasses import dataclass

from bench.request import RequestResult

PERCENTILES = (50, 90, 99)


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), on an already sorted list."""
    position = (len(sorted_values) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


@dataclass(slots=True)
class Distribution:
    """Mean and percentiles in milliseconds; all None when nothing was measured."""

    mean: float | None = None
    p50: float | None = None
    p90: float | None = None
    p99: float | None = None

    @classmethod
    def of_seconds(cls, values: list[float]) -> Distribution:
        if not values:
            return cls()
        ms = sorted(v * 1000 for v in values)
        p50, p90, p99 = (percentile(ms, q) for q in PERCENTILES)
        return cls(mean=sum(ms) / len(ms), p50=p50, p90=p90, p99=p99)


@dataclass(slots=True)
class LevelReport:
    """What one load level measured. Throughputs divide by the level's wall time, first send to last reply."""

    mode: str
    concurrency: int | None
    request_rate: float | None
    duration_s: float
    completed: int
    failed: int
    errors: dict[str, int]
    output_len_mismatch: int
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    ttft_ms: Distribution
    tpot_ms: Distribution
    itl_ms: Distribution
    e2e_ms: Distribution

    @classmethod
    def build(
        cls,
        results: list[RequestResult],
        duration_s: float,
        output_len: int,
        concurrency: int | None = None,
        request_rate: float | None = None,
    ) -> LevelReport:
        ok = [r for r in results if r.ok]
        errors: dict[str, int] = {}
        for r in results:
            if not r.ok:
                errors[r.error] = errors.get(r.error, 0) + 1
        input_tokens = sum(r.prompt_tokens for r in ok)
        output_tokens = sum(r.output_tokens for r in ok)
        wall = max(duration_s, 1e-9)
        return cls(
            mode="closed" if request_rate is None else "poisson",
            concurrency=concurrency,
            request_rate=request_rate,
            duration_s=duration_s,
            completed=len(ok),
            failed=len(results) - len(ok),
            errors=errors,
            output_len_mismatch=sum(r.output_tokens != output_len for r in ok),
            total_input_tokens=input_tokens,
            total_output_tokens=output_tokens,
            request_throughput=len(ok) / wall,
            output_throughput=output_tokens / wall,
            total_token_throughput=(input_tokens + output_tokens) / wall,
            ttft_ms=Distribution.of_seconds([r.ttft for r in ok]),
            tpot_ms=Distribution.of_seconds([r.tpot for r in ok if r.tpot is not None]),
            itl_ms=Distribution.of_seconds([gap for r in ok for gap in r.itl]),
            e2e_ms=Distribution.of_seconds([r.e2e for r in ok]),
        )
