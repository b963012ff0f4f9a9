"""The /metrics exposition: vLLM's names, types, labels and buckets under `gptserve:`, read back as Prometheus
reads it."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.metrics import FINISHED_REASONS, Metrics

# Exposed family name (as the parser reports it: counters without `_total`) -> type.
EXPECTED_FAMILIES = {
    "gptserve:num_requests_running": "gauge",
    "gptserve:num_requests_waiting": "gauge",
    "gptserve:kv_cache_usage_perc": "gauge",
    "gptserve:kv_cache_blocks_used": "gauge",
    "gptserve:prefix_cache_queries": "counter",
    "gptserve:prefix_cache_hits": "counter",
    "gptserve:num_preemptions": "counter",
    "gptserve:num_steps_interrupted": "counter",
    "gptserve:prompt_tokens": "counter",
    "gptserve:generation_tokens": "counter",
    "gptserve:request_success": "counter",
    "gptserve:iteration_tokens_total": "histogram",
    "gptserve:time_to_first_token_seconds": "histogram",
    "gptserve:inter_token_latency_seconds": "histogram",
    "gptserve:request_time_per_output_token_seconds": "histogram",
    "gptserve:e2e_request_latency_seconds": "histogram",
    "gptserve:request_queue_time_seconds": "histogram",
    "gptserve:request_prefill_time_seconds": "histogram",
    "gptserve:request_decode_time_seconds": "histogram",
    "gptserve:request_prompt_tokens": "histogram",
    "gptserve:request_generation_tokens": "histogram",
    "gptserve:http_requests": "counter",
}

# vLLM v1's own edges: each must still be an edge here, so vLLM dashboards' histogram_quantile reads alike.
VLLM_EDGES = {
    "gptserve:time_to_first_token_seconds": [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
                                             1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0],
    "gptserve:inter_token_latency_seconds": [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
                                             2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0],
    "gptserve:e2e_request_latency_seconds": [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
                                             50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0],
    "gptserve:iteration_tokens_total": [1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384],
    "gptserve:request_prompt_tokens": [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000,
                                       100000],
}
MODEL_FAMILIES = [name for name in EXPECTED_FAMILIES if name != "gptserve:http_requests"]


def scrape(metrics: Metrics) -> dict[str, object]:
    body, _ = metrics.exposition()
    return {family.name: family for family in text_string_to_metric_families(body.decode())}


def value(metrics: Metrics, sample_name: str, **labels: str) -> float:
    """The one sample with this name whose labels include `labels`."""
    found = [s.value for family in scrape(metrics).values() for s in family.samples
             if s.name == sample_name and labels.items() <= s.labels.items()]
    assert len(found) == 1, f"{sample_name}{labels}: {len(found)} samples"
    return found[0]


def bucket_edges(metrics: Metrics, family: str, model: str) -> list[float]:
    samples = scrape(metrics)[family].samples
    return [float(s.labels["le"]) for s in samples
            if s.name == family + "_bucket" and s.labels["model_name"] == model and s.labels["le"] != "+Inf"]


def test_every_family_is_exposed_with_vllm_type() -> None:
    metrics = Metrics()
    metrics.for_model("gpt2")
    metrics.count_http("/v1/models", "GET", 200)
    families = scrape(metrics)
    for name, kind in EXPECTED_FAMILIES.items():
        assert families[name].type == kind, name


def test_every_model_series_carries_only_the_model_name_label() -> None:
    metrics = Metrics()
    metrics.for_model("gpt2")
    families = scrape(metrics)
    for name in MODEL_FAMILIES:
        for sample in families[name].samples:
            extra = set(sample.labels) - {"model_name", "le", "finished_reason"}
            assert sample.labels["model_name"] == "gpt2" and not extra, sample


def test_idle_model_reads_zero_everywhere() -> None:
    metrics = Metrics()
    metrics.for_model("gpt2")
    families = scrape(metrics)
    samples = [s for name in MODEL_FAMILIES for s in families[name].samples]
    assert samples and all(s.value == 0 for s in samples)
    reasons = {s.labels["finished_reason"] for s in families["gptserve:request_success"].samples}
    assert reasons == {"stop", "length", "abort", "error"} == set(FINISHED_REASONS)


def test_buckets_keep_vllm_edges_and_reach_gpu_milliseconds_and_cpu_minutes() -> None:
    metrics = Metrics()
    metrics.for_model("gpt2")
    for family, edges in VLLM_EDGES.items():
        assert set(edges) <= set(bucket_edges(metrics, family, "gpt2")), family
    for family in ("gptserve:inter_token_latency_seconds", "gptserve:request_time_per_output_token_seconds"):
        edges = bucket_edges(metrics, family, "gpt2")
        assert edges[0] <= 0.001 and 0.002 < edges[1] < 0.01 and edges[-1] >= 60, family
    for family in ("gptserve:e2e_request_latency_seconds", "gptserve:request_queue_time_seconds",
                   "gptserve:request_prefill_time_seconds", "gptserve:request_decode_time_seconds"):
        edges = bucket_edges(metrics, family, "gpt2")
        assert edges[0] <= 0.001 and edges[-1] >= 3600, family
    assert bucket_edges(metrics, "gptserve:time_to_first_token_seconds", "gpt2")[-1] >= 600


def test_scheduler_state_sets_queues_and_kv_usage_fraction() -> None:
    metrics = Metrics()
    model = metrics.for_model("gpt2")
    model.scheduler_state(running=3, waiting=5, kv_blocks_used=25, kv_blocks_total=100)
    assert value(metrics, "gptserve:num_requests_running") == 3
    assert value(metrics, "gptserve:num_requests_waiting") == 5
    assert value(metrics, "gptserve:kv_cache_blocks_used") == 25
    assert value(metrics, "gptserve:kv_cache_usage_perc") == 0.25
    model.scheduler_state(running=0, waiting=0, kv_blocks_used=0, kv_blocks_total=0)
    assert value(metrics, "gptserve:kv_cache_usage_perc") == 0


def test_step_observes_tokens_per_engine_step() -> None:
    metrics = Metrics()
    model = metrics.for_model("gpt2")
    model.step(num_tokens=5)
    model.step(num_tokens=16)
    assert value(metrics, "gptserve:iteration_tokens_total_count") == 2
    assert value(metrics, "gptserve:iteration_tokens_total_sum") == 21
    assert value(metrics, "gptserve:iteration_tokens_total_bucket", le="8.0") == 1
    assert value(metrics, "gptserve:iteration_tokens_total_bucket", le="16.0") == 2


def test_generated_tokens_count_as_they_come_and_prompt_tokens_when_their_prefill_is_done() -> None:
    metrics = Metrics()
    model = metrics.for_model("gpt2")
    model.prompt_processed(12)
    assert value(metrics, "gptserve:prompt_tokens_total") == 12
    model.first_token(0.5)
    model.inter_token(0.1)
    assert value(metrics, "gptserve:generation_tokens_total") == 2
    model.inter_token(0.1)
    model.request_finished("stop", prompt_tokens=12, generation_tokens=3, e2e=0.8, queue=0.1, prefill=0.4, decode=0.2)
    assert value(metrics, "gptserve:generation_tokens_total") == 3
    assert value(metrics, "gptserve:prompt_tokens_total") == 12


def test_prefix_cache_and_preemptions_are_counted() -> None:
    metrics = Metrics()
    model = metrics.for_model("gpt2")
    model.prefix_cache(queried_tokens=64, hit_tokens=48)
    model.prefix_cache(queried_tokens=16, hit_tokens=0)
    model.preempted()
    assert value(metrics, "gptserve:prefix_cache_queries_total") == 80
    assert value(metrics, "gptserve:prefix_cache_hits_total") == 48
    assert value(metrics, "gptserve:num_preemptions_total") == 1


def test_token_latencies_land_in_their_buckets() -> None:
    metrics = Metrics()
    model = metrics.for_model("gpt2")
    model.first_token(0.03)
    model.inter_token(0.002)
    model.inter_token(1.7)
    assert value(metrics, "gptserve:time_to_first_token_seconds_bucket", le="0.02") == 0
    assert value(metrics, "gptserve:time_to_first_token_seconds_bucket", le="0.04") == 1
    assert value(metrics, "gptserve:inter_token_latency_seconds_bucket", le="0.0025") == 1
    assert value(metrics, "gptserve:inter_token_latency_seconds_bucket", le="2.5") == 2
    assert value(metrics, "gptserve:inter_token_latency_seconds_sum") == pytest.approx(1.702)


def test_request_finished_records_reason_sizes_and_phases() -> None:
    metrics = Metrics()
    model = metrics.for_model("gpt2")
    model.request_finished("length", prompt_tokens=30, generation_tokens=11,
                           e2e=2.0, queue=0.25, prefill=0.75, decode=1.0)
    assert value(metrics, "gptserve:request_success_total", finished_reason="length") == 1
    assert value(metrics, "gptserve:request_success_total", finished_reason="stop") == 0
    assert value(metrics, "gptserve:request_prompt_tokens_sum") == 30
    assert value(metrics, "gptserve:request_generation_tokens_bucket", le="20.0") == 1
    assert value(metrics, "gptserve:request_generation_tokens_bucket", le="10.0") == 0
    assert value(metrics, "gptserve:e2e_request_latency_seconds_sum") == 2.0
    assert value(metrics, "gptserve:request_queue_time_seconds_sum") == 0.25
    assert value(metrics, "gptserve:request_prefill_time_seconds_sum") == 0.75
    assert value(metrics, "gptserve:request_decode_time_seconds_sum") == 1.0
    assert value(metrics, "gptserve:request_time_per_output_token_seconds_sum") == pytest.approx(0.1)


def test_single_token_request_has_no_time_per_output_token() -> None:
    metrics = Metrics()
    model = metrics.for_model("gpt2")
    model.request_finished("stop", prompt_tokens=5, generation_tokens=1, e2e=0.1, queue=0.0, prefill=0.1, decode=0.0)
    assert value(metrics, "gptserve:request_time_per_output_token_seconds_count") == 0
    assert value(metrics, "gptserve:e2e_request_latency_seconds_count") == 1


def test_unknown_finished_reason_is_rejected() -> None:
    model = Metrics().for_model("gpt2")
    with pytest.raises(KeyError):
        model.request_finished("timeout", prompt_tokens=1, generation_tokens=1, e2e=1, queue=0, prefill=1, decode=0)


def test_two_models_keep_separate_series() -> None:
    metrics = Metrics()
    gpt2, oss = metrics.for_model("gpt2"), metrics.for_model("gpt-oss-20b")
    gpt2.scheduler_state(running=2, waiting=0, kv_blocks_used=10, kv_blocks_total=20)
    oss.prompt_processed(7)
    oss.first_token(0.2)
    oss.request_finished("abort", prompt_tokens=7, generation_tokens=1, e2e=1, queue=0, prefill=1, decode=0)
    assert value(metrics, "gptserve:num_requests_running", model_name="gpt2") == 2
    assert value(metrics, "gptserve:num_requests_running", model_name="gpt-oss-20b") == 0
    assert value(metrics, "gptserve:prompt_tokens_total", model_name="gpt2") == 0
    assert value(metrics, "gptserve:prompt_tokens_total", model_name="gpt-oss-20b") == 7
    assert value(metrics, "gptserve:request_success_total", model_name="gpt-oss-20b", finished_reason="abort") == 1
    assert value(metrics, "gptserve:request_success_total", model_name="gpt2", finished_reason="abort") == 0


def test_for_model_returns_the_same_series_for_the_same_name() -> None:
    metrics = Metrics()
    assert metrics.for_model("gpt2") is metrics.for_model("gpt2")


def test_http_requests_are_counted_by_endpoint_method_and_status() -> None:
    metrics = Metrics()
    metrics.count_http("/v1/completions", "POST", 200)
    metrics.count_http("/v1/completions", "POST", 200)
    metrics.count_http("/v1/completions", "POST", 429)
    metrics.count_http("/health", "GET", 200)
    assert scrape(metrics)["gptserve:http_requests"].type == "counter"
    assert value(metrics, "gptserve:http_requests_total", endpoint="/v1/completions", status="200") == 2
    assert value(metrics, "gptserve:http_requests_total", endpoint="/v1/completions", method="POST",
                 status="429") == 1
    assert value(metrics, "gptserve:http_requests_total", endpoint="/health", method="GET", status="200") == 1


def test_made_up_http_methods_share_one_series() -> None:
    """Any client (even one refused with 401) picks the method token: it must not mint a series per request."""
    metrics = Metrics()
    for i in range(50):
        metrics.count_http("unmatched", f"BREW{i}", 401)
    metrics.count_http("unmatched", "GET", 401)
    methods = {sample.labels["method"] for sample in scrape(metrics)["gptserve:http_requests"].samples}
    assert methods == {"other", "GET"}
    assert value(metrics, "gptserve:http_requests_total", method="other", status="401") == 50


def test_exposition_is_prometheus_text_with_process_metrics_and_no_created_series() -> None:
    body, content_type = Metrics().exposition()
    assert content_type.startswith("text/plain; version=0.0.4")
    text = body.decode()
    assert "process_resident_memory_bytes" in text and "_created" not in text


def test_separate_instances_do_not_share_a_registry() -> None:
    first, second = Metrics(), Metrics()
    first.for_model("gpt2").preempted()
    second.for_model("gpt2")
    assert value(second, "gptserve:num_preemptions_total") == 0


def test_promtool_lint_finds_nothing_beyond_vllm_naming() -> None:
    """promtool's linter objects only to what we keep for vLLM parity: colons and a histogram named `_total`."""
    promtool = shutil.which("promtool")
    assert promtool, "promtool missing: apt-get install prometheus"
    metrics = Metrics()
    metrics.for_model("gpt2").request_finished("stop", 1, 2, 1.0, 0.1, 0.2, 0.7)
    metrics.count_http("/v1/completions", "POST", 200)
    body, _ = metrics.exposition()
    result = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True, timeout=30)
    findings = (result.stdout + result.stderr).decode().splitlines()
    accepted = ("metric names should not contain ':'",
                'gptserve:iteration_tokens_total non-counter metrics should not have "_total" suffix')
    unexpected = [line for line in findings if line.strip() and not line.endswith(accepted)]
    assert not unexpected, unexpected
