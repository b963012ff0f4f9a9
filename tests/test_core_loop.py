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
