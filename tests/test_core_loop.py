"""The engine core's loop, driven in-process over inproc ZeroMQ sockets (no process, no HTTP)."""

from __future__ import annotations

import pytest
import zmq

from models.loader import load_model
from server.engine import core_messages as wire
from server.engine.engine import EngineConfig, LLMEngine
from server.engine.metric_events import MetricRecorder
from server.engine.sampling_params import SamplingParams
from tests.inproc_core import InprocCore


@pytest.fixture
def core(tiny_gpt2_dir):
    engine = LLMEngine(load_model(tiny_gpt2_dir, dtype="float32", device="cpu"),
                       EngineConfig(kv_cache_tokens=1024, block_size=8))
    inproc = InprocCore(engine)
    yield inproc.core, inproc.to_core
    inproc.close()


def send(socket: zmq.Socket, message: wire.ToCore) -> None:
    socket.send(wire.encoder.encode(message))


def test_only_a_new_request_interrupts_a_decode_step_and_commands_keep_their_order(core):
    engine_core, to_core = core
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    send(to_core, wire.AddRequest("a", [1, 2, 3], params, 1))
    engine_core._apply_commands()
    send(to_core, wire.StopChoice("a", 0))
    assert not engine_core._request_arrived()  # a stop waits for the step's end
    send(to_core, wire.AddRequest("b", [4, 5, 6], params, 1))
    assert engine_core._request_arrived()
    outputs = engine_core._apply_commands()
    assert outputs[0][0] == "a" and outputs[0][1].finish_reason == "stop"
    assert set(engine_core.engine.requests) == {"b"}
    assert not engine_core._request_arrived()


def test_metric_calls_made_in_the_core_reach_the_front_ends_registry_as_made():
    from server.engine.engine_stats import EngineStats
    from server.engine.metric_events import replay
    from server.metrics import Metrics

    recorder = MetricRecorder()
    recorder.first_token(0.25)
    recorder.inter_token(0.125)
    recorder.step(3)
    recorder.request_finished("length", prompt_tokens=5, generation_tokens=2, e2e=1.0, queue=0.5, prefill=0.25,
                              decode=0.125)
    recorder.scheduler_state(1, 2, 3, 4)
    message = wire.StepOutputs([], recorder.take(), EngineStats(1, 2, 3, 4, 0))
    decoded = wire.from_core.decode(wire.encoder.encode(message))
    metrics = Metrics()
    replay(decoded.events, metrics.for_model("tiny"))
    text = metrics.exposition()[0].decode()
    for line in ('gptserve:generation_tokens_total{model_name="tiny"} 2.0',
                 'gptserve:request_success_total{finished_reason="length",model_name="tiny"} 1.0',
                 'gptserve:num_requests_waiting{model_name="tiny"} 2.0',
                 'gptserve:time_to_first_token_seconds_sum{model_name="tiny"} 0.25',
                 'gptserve:request_prompt_tokens_sum{model_name="tiny"} 5.0'):
        assert line in text, line
    assert not recorder.take()  # taken once: nothing is sent twice


class CallLog:
    """A metrics sink that writes down each call it gets."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple]] = []

    def __getattr__(self, name: str):
        return lambda *args: self.calls.append((name, args))


def two_steps() -> list[list]:
    recorder = MetricRecorder()
    batches = []
    for running, seconds in ((1, 0.25), (0, 0.125)):
        recorder.inter_token(seconds)
        recorder.scheduler_state(running, 0, running * 3, 8)
        batches.append(recorder.take())
    return batches


def test_metric_backlog_makes_every_call_at_a_scrape_but_only_the_last_gauge_update():
    from server.engine.metric_events import MetricBacklog
    from server.metrics import Metrics

    sink = CallLog()
    backlog = MetricBacklog(sink)  # type: ignore[arg-type]
    for batch in two_steps():
        backlog.add(batch)
    assert sink.calls == []  # nothing on the per-token path
    backlog.flush()
    assert sink.calls == [("inter_token", (0.25,)), ("inter_token", (0.125,)), ("scheduler_state", (0, 0, 0, 8))]

    metrics = Metrics()
    backlog = MetricBacklog(metrics.for_model("tiny"))
    metrics.before_exposition(backlog.flush)
    for batch in two_steps():
        backlog.add(batch)
    text = metrics.exposition()[0].decode()
    assert 'gptserve:generation_tokens_total{model_name="tiny"} 2.0' in text
    assert 'gptserve:num_requests_running{model_name="tiny"} 0.0' in text


def test_metric_backlog_replays_by_itself_once_enough_calls_wait_for_a_scrape():
    from server.engine.metric_events import MAX_BACKLOG_EVENTS, MetricBacklog

    sink = CallLog()
    backlog = MetricBacklog(sink)  # type: ignore[arg-type]
    for _ in range(MAX_BACKLOG_EVENTS // 2):
        backlog.add(two_steps()[0])
    assert len(sink.calls) == MAX_BACKLOG_EVENTS // 2 + 1  # every inter_token, one scheduler_state
