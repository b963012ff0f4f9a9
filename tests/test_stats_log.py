"""The periodic log line per model (vLLM's "Avg prompt throughput: ..."), and --disable-log-stats."""

from __future__ import annotations

import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from server.engine.engine_stats import EngineStats
from server.metrics import Metrics
from server.stats_log import StatsLog
from tests.server_process import ServerProcess

PREFIX = "Avg prompt throughput"


class FakeEngine:
    def __init__(self) -> None:
        self.now = EngineStats(running=0, waiting=0, kv_blocks_used=0, kv_blocks_total=100, num_preemptions=0)

    def stats(self) -> EngineStats:
        return self.now


def stats_lines(caplog) -> list[logging.LogRecord]:
    return [record for record in caplog.records if record.getMessage().startswith(PREFIX)]


def test_each_line_gives_the_intervals_rates_and_the_engines_state(caplog):
    metrics, engine, clock = Metrics(), FakeEngine(), [100.0]
    model = metrics.for_model("m")
    log = StatsLog(metrics, {"m": engine}, 5.0, clock=lambda: clock[0])
    caplog.set_level(logging.INFO, logger="gptserve")
    log.take_readings()
    model.prompt_processed(30)
    for _ in range(20):
        model.inter_token(0.01)
    model.request_finished("stop", prompt_tokens=30, generation_tokens=20, e2e=1, queue=0, prefill=0.5, decode=0.5)
    model.prefix_cache(queried_tokens=40, hit_tokens=10)
    engine.now = EngineStats(running=3, waiting=2, kv_blocks_used=25, kv_blocks_total=100, num_preemptions=1)
    clock[0] += 5.0
    log.take_readings()
    [line] = stats_lines(caplog)
    assert line.getMessage() == ("Avg prompt throughput: 6.0 tokens/s, Avg generation throughput: 4.0 tokens/s, "
                                 "Running: 3 reqs, Waiting: 2 reqs, KV cache usage: 25.0%, "
                                 "Prefix cache hit rate: 25.0%")
    assert (line.model, line.generation_throughput, line.prompt_throughput, line.preemptions) == ("m", 4.0, 6.0, 1)


def test_an_idle_model_logs_once_more_then_nothing(caplog):
    metrics, engine, clock = Metrics(), FakeEngine(), [0.0]
    log = StatsLog(metrics, {"m": engine}, 1.0, clock=lambda: clock[0])
    caplog.set_level(logging.INFO, logger="gptserve")
    log.take_readings()
    clock[0] += 1
    log.take_readings()
    assert not stats_lines(caplog)  # never worked
    metrics.for_model("m").first_token(0.1)
    for _ in range(4):
        clock[0] += 1
        log.take_readings()
    assert [record.generation_throughput for record in stats_lines(caplog)] == [1.0, 0.0]


def read_stats(server: ServerProcess) -> list[dict]:
    lines = [json.loads(line) for line in server.log_text().splitlines() if line.startswith("{")]
    return [line for line in lines if line["msg"].startswith(PREFIX)]


def generate(server: ServerProcess, requests: int) -> None:
    body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 24, "ignore_eos": True}
    with ThreadPoolExecutor(requests) as pool:
        replies = list(pool.map(lambda _: httpx.post(server.v1 + "/completions", json=body, timeout=120),
                                range(requests)))
    assert all(reply.status_code == 200 for reply in replies)


@pytest.mark.parametrize("disabled", [False, True])
def test_a_served_model_logs_its_stats_while_it_works(tiny_gpt2_dir, disabled):
    args = ["--model", f"tiny={tiny_gpt2_dir}", "--log-stats-interval", "0.25"]
    with ServerProcess(args + (["--disable-log-stats"] if disabled else [])) as server:
        generate(server, 4)
        time.sleep(1.0)  # the interval the requests ended in, and an idle one after it
        logged = read_stats(server)
        time.sleep(0.75)
        assert read_stats(server) == logged  # idle: nothing more
    if disabled:
        assert logged == []
        return
    assert {line["model"] for line in logged} == {"tiny"}
    assert any(line["generation_throughput"] > 0 for line in logged)
    assert any(line["prompt_throughput"] > 0 for line in logged)
    assert logged[-1]["generation_throughput"] == 0 and logged[-1]["running"] == 0
