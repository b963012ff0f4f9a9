"""Prometheus metrics for GET /metrics, named as vLLM (v1) names them with the prefix `gptserve:`.

Names, types, the `model_name` label and the bucket edges follow vLLM so that a vLLM dashboard works here after
replacing `vllm:` with `gptserve:`. Buckets are vLLM's, widened where one side of our range needs it: GPU decode
steps of a few milliseconds, CPU requests that take minutes. Metrics the engine does not know of (HTTP status
codes) live in `gptserve:http_requests_total{endpoint,method,status}`.

One `Metrics` per server process owns the registry; each served model gets a `ModelMetrics` whose label values
are bound once, so each call from the engine thread is a plain increment or observation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)

FINISHED_REASONS = ("stop", "length", "abort", "error")
# The methods HTTP defines; any other token a client sends is counted as "other", so made-up methods (answered,
# and counted, even without the API key) cannot grow /metrics and the registry without bound.
HTTP_METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"))
# The classic text format, which every Prometheus reads; newer clients announce 1.0.0 for the same bytes.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Seconds from arrival to the first token: vLLM's edges already span 1 ms (GPU) to 43 min (a queued CPU prompt).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
# Seconds per output token: vLLM starts at 10 ms; a GPU decode step of GPT-2 takes 1-5 ms, so edges go below.
TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
                         0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
# Seconds of a request phase: vLLM starts at 0.3 s; queue, prefill and short GPU requests take milliseconds.
REQUEST_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0,
                           10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
# Tokens per request: vLLM's 1-2-5 series; buckets are shared by all models, so it runs to GPT-OSS's 131072 context.
TOKEN_COUNT_BUCKETS = tuple(m * 10**e for e in range(6) for m in (1, 2, 5) if m * 10**e <= 131072)
# Tokens computed in one engine step, as vLLM counts them.
ITERATION_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


class ModelMetrics:
    """One served model's series. Called from the engine thread: every method is a few locked increments."""

    def __init__(self, families: dict[str, Counter | Gauge | Histogram], model_name: str) -> None:
        def bind(name: str, **labels: str) -> Any:  # the family's child for this model: a Gauge, Counter or Histogram
            return families[name].labels(model_name=model_name, **labels)

        self._running = bind("num_requests_running")
        self._waiting = bind("num_requests_waiting")
        self._kv_usage = bind("kv_cache_usage_perc")
        self._kv_blocks = bind("kv_cache_blocks_used")
        self._cache_queries = bind("prefix_cache_queries")
        self._cache_hits = bind("prefix_cache_hits")
        self._preemptions = bind("num_preemptions")
        self._interrupted = bind("num_steps_interrupted")
        self._prompt_tokens = bind("prompt_tokens")
        self._generation_tokens = bind("generation_tokens")
        self._iteration_tokens = bind("iteration_tokens")
        self._ttft = bind("time_to_first_token")
        self._itl = bind("inter_token_latency")
        self._tpot = bind("request_time_per_output_token")
        self._e2e = bind("e2e_request_latency")
        self._queue = bind("request_queue_time")
        self._prefill = bind("request_prefill_time")
        self._decode = bind("request_decode_time")
        self._request_prompt = bind("request_prompt_tokens")
        self._request_generation = bind("request_generation_tokens")
        # Every reason is bound up front so an idle server already reports each one as 0.
        self._finished = {reason: bind("request_success", finished_reason=reason) for reason in FINISHED_REASONS}

    def scheduler_state(self, running: int, waiting: int, kv_blocks_used: int, kv_blocks_total: int) -> None:
        """After each schedule: queue lengths and the KV blocks held by live requests (cached free blocks excluded)."""
        self._running.set(running)
        self._waiting.set(waiting)
        self._kv_blocks.set(kv_blocks_used)
        self._kv_usage.set(kv_blocks_used / kv_blocks_total if kv_blocks_total else 0.0)

    def step(self, num_tokens: int) -> None:
        """One engine step computed `num_tokens` tokens: prompt chunks plus one per decoding sequence."""
        self._iteration_tokens.observe(num_tokens)

    def prefix_cache(self, queried_tokens: int, hit_tokens: int) -> None:
        """A new request's prompt looked up in the prefix cache: tokens asked for and tokens found."""
        self._cache_queries.inc(queried_tokens)
        self._cache_hits.inc(hit_tokens)

    def preempted(self) -> None:
        self._preemptions.inc()

    def step_interrupted(self) -> None:
        """A step of decodes was given up part-way for a newcomer's prompt (its layers so far are lost work)."""
        self._interrupted.inc()

    def prompt_processed(self, prompt_tokens: int) -> None:
        """A sequence's prompt is in (its prefill done), as vLLM counts prompt tokens: prompt throughput stays live
        while long answers run."""
        self._prompt_tokens.inc(prompt_tokens)

    def first_token(self, seconds: float) -> None:
        """A sequence's first token, `seconds` after arrival. Counted as it comes, so throughput graphs stay live."""
        self._ttft.observe(seconds)
        self._generation_tokens.inc()

    def inter_token(self, seconds: float) -> None:
        """A sequence's next token, `seconds` after its previous one."""
        self._itl.observe(seconds)
        self._generation_tokens.inc()

    def request_finished(self, finished_reason: str, prompt_tokens: int, generation_tokens: int,
                         e2e: float, queue: float, prefill: float, decode: float) -> None:
        """A request left the engine. `finished_reason` is one of FINISHED_REASONS; an unknown one raises KeyError.

        Phases: queue = arrival to first schedule, prefill = first schedule to first token, decode = first token
        to last token, e2e = arrival to finish.
        """
        self._finished[finished_reason].inc()
        self._request_prompt.observe(prompt_tokens)
        self._request_generation.observe(generation_tokens)
        self._e2e.observe(e2e)
        self._queue.observe(queue)
        self._prefill.observe(prefill)
        self._decode.observe(decode)
        # A mean over the gaps between tokens: undefined for fewer than two tokens, so not observed.
        if generation_tokens > 1:
            self._tpot.observe(decode / (generation_tokens - 1))


class Metrics:
    """The server process's registry: one per process, shared by every model it serves and by the HTTP layer."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        # The text format would show each series' creation time as a gauge of its own, doubling what a
        # dashboard has to skip; vLLM exposes none either. The switch is process-wide, as this object is.
        disable_created_metrics()
        if registry is None:
            registry = CollectorRegistry()
            ProcessCollector(registry=registry)
            PlatformCollector(registry=registry)
        self.registry = registry
        self._models: dict[str, ModelMetrics] = {}
        self._flushes: list[Callable[[], None]] = []
        self._families = _model_families(registry)
        self._http = Counter("gptserve:http_requests_total", "HTTP requests answered, by route, method and status.",
                             ["endpoint", "method", "status"], registry=registry)

    def for_model(self, model_name: str) -> ModelMetrics:
        """The series of one served model, created on first use and shared after."""
        if model_name not in self._models:
            self._models[model_name] = ModelMetrics(self._families, model_name)
        return self._models[model_name]

    def count_http(self, endpoint: str, method: str, status: int) -> None:
        """`endpoint` is the route template (`/v1/completions`), never a raw path, and `method` one of
        HTTP_METHODS or "other", to keep the series bounded."""
        method = method if method in HTTP_METHODS else "other"
        self._http.labels(endpoint=endpoint, method=method, status=str(status)).inc()

    def before_exposition(self, flush: Callable[[], None]) -> None:
        """``flush`` is called before every exposition: calls made in batches are all in what a scrape reads."""
        self._flushes.append(flush)

    def flush(self) -> None:
        """Make the calls waiting in batches, before the registry is read."""
        for flush in self._flushes:
            flush()

    def exposition(self) -> tuple[bytes, str]:
        """Body and content type for GET /metrics (Prometheus text format)."""
        self.flush()
        return generate_latest(self.registry), CONTENT_TYPE


def _model_families(registry: CollectorRegistry) -> dict[str, Counter | Gauge | Histogram]:
    """Every per-model family, keyed by its name without prefix or `_total`/`_seconds` suffix."""
    label = ["model_name"]

    def gauge(name: str, doc: str) -> Gauge:
        return Gauge(f"gptserve:{name}", doc, label, registry=registry)

    def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> Counter:
        return Counter(f"gptserve:{name}_total", doc, label + list(extra), registry=registry)

    def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
        return Histogram(f"gptserve:{name}", doc, label, buckets=buckets, registry=registry)

    return {
        "num_requests_running": gauge("num_requests_running", "Requests in the running batch."),
        "num_requests_waiting": gauge("num_requests_waiting", "Requests waiting to be scheduled."),
        "kv_cache_usage_perc": gauge("kv_cache_usage_perc", "KV-cache usage: fraction of blocks held, 1 is full."),
        "kv_cache_blocks_used": gauge("kv_cache_blocks_used", "KV-cache blocks held by live requests."),
        "prefix_cache_queries": counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache."),
        "prefix_cache_hits": counter("prefix_cache_hits", "Prompt tokens found in the prefix cache."),
        "num_preemptions": counter("num_preemptions", "Requests preempted to free KV-cache blocks."),
        "num_steps_interrupted": counter("num_steps_interrupted",
                                         "Steps given up part-way so that a newcomer's prompt starts sooner."),
        "prompt_tokens": counter("prompt_tokens", "Prompt tokens processed (counted as each prefill completes)."),
        "generation_tokens": counter("generation_tokens", "Tokens generated, counted as each is sampled."),
        "request_success": counter("request_success", "Requests finished, by finish reason.", ("finished_reason",)),
        "iteration_tokens": histogram("iteration_tokens_total", "Tokens per engine step.", ITERATION_TOKEN_BUCKETS),
        "time_to_first_token": histogram("time_to_first_token_seconds", "Time to first token in seconds.",
                                         TTFT_BUCKETS),
        "inter_token_latency": histogram("inter_token_latency_seconds", "Inter-token latency in seconds.",
                                         TOKEN_LATENCY_BUCKETS),
        "request_time_per_output_token": histogram("request_time_per_output_token_seconds",
                                                   "Mean time per output token of a request, in seconds.",
                                                   TOKEN_LATENCY_BUCKETS),
        "e2e_request_latency": histogram("e2e_request_latency_seconds", "End-to-end request latency in seconds.",
                                         REQUEST_LATENCY_BUCKETS),
        "request_queue_time": histogram("request_queue_time_seconds", "Time spent waiting before first schedule.",
                                        REQUEST_LATENCY_BUCKETS),
        "request_prefill_time": histogram("request_prefill_time_seconds",
                                          "Time from first schedule to first token.", REQUEST_LATENCY_BUCKETS),
        "request_decode_time": histogram("request_decode_time_seconds", "Time from first token to last token.",
                                         REQUEST_LATENCY_BUCKETS),
        "request_prompt_tokens": histogram("request_prompt_tokens", "Prompt tokens per request.",
                                           TOKEN_COUNT_BUCKETS),
        "request_generation_tokens": histogram("request_generation_tokens", "Generated tokens per request.",
                                               TOKEN_COUNT_BUCKETS),
    }
