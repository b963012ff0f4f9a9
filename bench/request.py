"""One streaming /v1/completions request, timed chunk by chunk.

Output tokens are counted from the server's ``usage.completion_tokens`` (we always ask for it with
``stream_options: {include_usage: true}``); a server that sends no usage is measured by counting the
streamed chunks that carry a choice, one token each. ITL is the gap between such chunks, so a server that
packs several tokens into one chunk shows fewer, longer gaps; TPOT, (e2e - TTFT) / (tokens - 1), does not
depend on chunking.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import httpx


@dataclass(slots=True)
class RequestResult:
    """Timings in seconds from the moment the request was sent. ``error`` names why it failed, "" if it did not."""

    error: str = ""
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int = 0

    @property
    def ok(self) -> bool:
        return not self.error

    @property
    def tpot(self) -> float | None:
        if self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


@dataclass(slots=True)
class StreamState:
    """What the SSE stream has told us so far."""

    chunk_times: list[float] = field(default_factory=list)
    usage: dict | None = None
    finished: bool = False
    error: str = ""

    def take(self, data: str, now: float) -> None:
        if data == "[DONE]":
            self.finished = True
            return
        chunk = json.loads(data)
        if "error" in chunk:
            self.error = "stream_error"
            return
        choices = chunk.get("choices") or []
        if choices:
            self.chunk_times.append(now)
            self.finished |= any(c.get("finish_reason") for c in choices)
        if chunk.get("usage"):
            self.usage = chunk["usage"]


async def send_completion(client: httpx.AsyncClient, url: str, payload: dict, headers: dict[str, str]) -> RequestResult:
    """Send one streaming completion and time it; failures are returned as results, never raised."""
    state = StreamState()
    start = time.perf_counter()
    try:
        async with client.stream("POST", url, json=payload, headers=headers) as response:
            if response.status_code != 200:
                await response.aread()
                return RequestResult(error=f"http_{response.status_code}")
            async for line in response.aiter_lines():
                if line.startswith("data:"):
                    state.take(line[len("data:"):].strip(), time.perf_counter() - start)
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        return RequestResult(error=type(exc).__name__)
    return _result(state, time.perf_counter() - start, len(payload["prompt"]))


def _result(state: StreamState, e2e: float, prompt_len: int) -> RequestResult:
    if state.error:
        return RequestResult(error=state.error)
    if not state.chunk_times:
        return RequestResult(error="no_tokens")
    if not state.finished:
        return RequestResult(error="incomplete_stream")
    usage = state.usage or {}
    times = state.chunk_times
    return RequestResult(
        ttft=times[0],
        e2e=e2e,
        itl=[b - a for a, b in zip(times, times[1:])],
        output_tokens=usage.get("completion_tokens") or len(times),
        prompt_tokens=usage.get("prompt_tokens") or prompt_len,
    )
