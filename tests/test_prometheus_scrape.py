"""A real Prometheus scrapes a real gptserve on loopback, and reads back what the requests did.

gptserve serves two models: `tiny`, whose requests all run to `max_tokens`, so its token counters must equal
what the responses reported, and `long` (a 1024-token context), whose one stream is dropped by the client
after its first chunk and so ends as an abort. Prometheus scrapes every second; the checks run on samples
scraped after all requests ended, read through Prometheus' HTTP API as a dashboard would.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from bench.server_process import free_port
from models.testing.gpt2_checkpoint import write_tiny_gpt2
from tests.server_process import ServerProcess

STARTUP_SECONDS = 30.0
SCRAPE_WAIT_SECONDS = 20.0
MAX_TOKENS = (4, 6, 9)  # the non-streaming `tiny` requests
STREAM_MAX_TOKENS = 5


@dataclass
class Traffic:
    """What the responses told the client."""
    completion_tokens: int = 0
    prompt_tokens: int = 0
    finished: list[str] = field(default_factory=list)  # finish reasons of the `tiny` requests


class Prometheus:
    """`prometheus` on a free loopback port with a throw-away config and TSDB, stopped by its pid. With
    ``tls_ca``, it scrapes over HTTPS and trusts that CA file."""

    def __init__(self, target: str, workdir: Path, tls_ca: str | None = None) -> None:
        binary = shutil.which("prometheus")
        assert binary, "the prometheus binary is missing; install it with: apt-get install prometheus"
        job: dict = {"job_name": "gptserve", "static_configs": [{"targets": [target]}]}
        if tls_ca is not None:
            job |= {"scheme": "https", "tls_config": {"ca_file": tls_ca}}
        config = workdir / "prometheus.yml"
        config.write_text(json.dumps({  # JSON is YAML
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
            "scrape_configs": [job],
        }))
        self.url = f"http://127.0.0.1:{free_port()}"
        self.args = [binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'tsdb'}",
                     f"--web.listen-address={self.url.removeprefix('http://')}", "--log.level=warn"]
        self.log = workdir / "prometheus.log"
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> Prometheus:
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + STARTUP_SECONDS
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"prometheus exited:\n{self.log.read_text()}"
            try:
                if httpx.get(self.url + "/-/ready", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.__exit__()
        raise TimeoutError(f"prometheus not ready after {STARTUP_SECONDS}s:\n{self.log.read_text()}")

    def __exit__(self, *exc_info: object) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def series(self, expr: str) -> list[dict]:
        response = httpx.get(self.url + "/api/v1/query", params={"query": expr}, timeout=10)
        body = response.json()
        assert response.status_code == 200 and body["status"] == "success", body
        return body["data"]["result"]

    def value(self, expr: str) -> float:
        """The value of a query that names exactly one series."""
        result = self.series(expr)
        assert len(result) == 1, f"{expr}: {len(result)} series: {result}"
        return float(result[0]["value"][1])


def send_traffic(server: ServerProcess) -> Traffic:
    traffic = Traffic()
    for max_tokens in MAX_TOKENS:
        body = {"model": "tiny", "prompt": f"Count to {max_tokens}:", "max_tokens": max_tokens, "ignore_eos": True}
        response = httpx.post(server.v1 + "/completions", json=body, timeout=30).json()
        traffic.completion_tokens += response["usage"]["completion_tokens"]
        traffic.prompt_tokens += response["usage"]["prompt_tokens"]
        traffic.finished.append(response["choices"][0]["finish_reason"])
    stream = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": STREAM_MAX_TOKENS, "ignore_eos": True,
              "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", server.v1 + "/completions", json=stream, timeout=30) as response:
        chunks = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    traffic.finished += [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]
                         and c["choices"][0]["finish_reason"]]
    traffic.completion_tokens += chunks[-1]["usage"]["completion_tokens"]
    traffic.prompt_tokens += chunks[-1]["usage"]["prompt_tokens"]
    assert httpx.post(server.v1 + "/completions", json={"model": "no-such-model", "prompt": "x"},
                      timeout=30).status_code == 404
    drop_a_stream(server)
    return traffic


def drop_a_stream(server: ServerProcess) -> None:
    """Start a long stream on `long`, read one chunk, hang up; return once the server has logged the request."""
    body = {"model": "long", "prompt": "Tell me everything.", "max_tokens": 1000, "ignore_eos": True,
            "stream": True}
    with httpx.Client(timeout=30) as client, client.stream("POST", server.v1 + "/completions", json=body) as response:
        request_id = response.headers["x-request-id"]
        next(line for line in response.iter_lines() if line.startswith("data: {"))
    deadline = time.monotonic() + 10
    while request_id not in server.log_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert request_id in server.log_text(), "the dropped stream was never logged as finished"


def wait_for_scrapes_after(prometheus: Prometheus, moment: float) -> None:
    """Until Prometheus holds >= 2 scrapes of gptserve and one of them started after `moment` (Unix seconds)."""
    deadline = time.monotonic() + SCRAPE_WAIT_SECONDS
    while time.monotonic() < deadline:
        latest = prometheus.series('timestamp(up{job="gptserve"})')
        count = prometheus.series('count_over_time(up{job="gptserve"}[10m])')
        if latest and count and float(latest[0]["value"][1]) > moment and float(count[0]["value"][1]) >= 2:
            return
        time.sleep(0.25)
    raise AssertionError(f"no scrape after the requests within {SCRAPE_WAIT_SECONDS}s: {latest}, {count}")


@pytest.fixture(scope="module")
def scraped(tiny_gpt2_dir, tmp_path_factory) -> Iterator[tuple[Prometheus, Traffic]]:
    workdir = tmp_path_factory.mktemp("scrape")
    long_dir = write_tiny_gpt2(workdir / "long", n_positions=1024)
    with ServerProcess(["--model", f"tiny={tiny_gpt2_dir}", "--model", f"long={long_dir}"]) as server:
        with Prometheus(f"127.0.0.1:{server.port}", workdir) as prometheus:
            traffic = send_traffic(server)
            wait_for_scrapes_after(prometheus, time.time())
            yield prometheus, traffic


def test_prometheus_sees_the_target_up(scraped):
    prometheus, _ = scraped
    assert prometheus.value('up{job="gptserve"}') == 1
    targets = httpx.get(prometheus.url + "/api/v1/targets", timeout=10).json()["data"]["activeTargets"]
    assert [(t["labels"]["job"], t["health"]) for t in targets] == [("gptserve", "up")]


def test_token_counters_equal_what_the_responses_reported(scraped):
    prometheus, traffic = scraped
    assert traffic.completion_tokens == sum(MAX_TOKENS) + STREAM_MAX_TOKENS
    assert prometheus.value('gptserve:generation_tokens_total{model_name="tiny"}') == traffic.completion_tokens
    assert prometheus.value('gptserve:prompt_tokens_total{model_name="tiny"}') == traffic.prompt_tokens


def test_finished_requests_are_counted_by_reason_per_model(scraped):
    prometheus, traffic = scraped
    assert traffic.finished == ["length"] * 4

    def finished(model: str, reason: str) -> float:
        return prometheus.value(f'gptserve:request_success_total{{model_name="{model}",finished_reason="{reason}"}}')

    assert [finished("tiny", reason) for reason in ("length", "stop", "abort", "error")] == [4, 0, 0, 0]
    assert [finished("long", reason) for reason in ("length", "stop", "abort", "error")] == [0, 0, 1, 0]


def test_http_requests_are_counted_by_route_and_status(scraped):
    prometheus, _ = scraped
    completions = 'gptserve:http_requests_total{endpoint="/v1/completions",method="POST",status="%s"}'
    assert prometheus.value(completions % "200") == 5  # four answered, one stream dropped after its headers
    assert prometheus.value(completions % "404") == 1
    assert prometheus.value('gptserve:http_requests_total{endpoint="/health",status="200"}') >= 1


def test_latency_histograms_count_every_request(scraped):
    prometheus, _ = scraped
    assert prometheus.value('gptserve:time_to_first_token_seconds_count{model_name="tiny"}') == 4
    assert prometheus.value('gptserve:time_to_first_token_seconds_count{model_name="long"}') == 1
    assert prometheus.value('gptserve:e2e_request_latency_seconds_count{model_name="tiny"}') == 4
    gaps = sum(MAX_TOKENS) + STREAM_MAX_TOKENS - 4
    assert prometheus.value('gptserve:inter_token_latency_seconds_count{model_name="tiny"}') == gaps
    p99 = prometheus.value('histogram_quantile(0.99, sum by (le) (gptserve:time_to_first_token_seconds_bucket))')
    assert 0 < p99 < 60


def test_idle_server_reads_zero_kv_usage_and_empty_queues(scraped):
    prometheus, _ = scraped
    for model in ("tiny", "long"):
        for gauge in ("kv_cache_usage_perc", "kv_cache_blocks_used", "num_requests_running",
                      "num_requests_waiting"):
            assert prometheus.value(f'gptserve:{gauge}{{model_name="{model}"}}') == 0, (model, gauge)


def test_dropped_stream_counts_its_tokens_on_its_own_model_only(scraped):
    prometheus, traffic = scraped
    assert prometheus.value('gptserve:generation_tokens_total{model_name="long"}') >= 1
    total = prometheus.value("sum(gptserve:generation_tokens_total)")
    assert total - prometheus.value('gptserve:generation_tokens_total{model_name="long"}') == traffic.completion_tokens
