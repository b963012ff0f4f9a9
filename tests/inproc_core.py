"""The engine core's loop (server/engine/core_process.EngineCore) driven in this process over inproc ZeroMQ
sockets: the real loop, commands and wire format, without a process or HTTP in the way."""

from __future__ import annotations

import itertools

import zmq

from server.engine import core_messages as wire
from server.engine.core_process import Channel, EngineCore
from server.engine.engine import LLMEngine
from server.engine.metric_events import MetricRecorder

_names = itertools.count()


class InprocCore:
    def __init__(self, engine: LLMEngine, recorder: MetricRecorder | None = None) -> None:
        self.context = zmq.Context()
        name = next(_names)
        commands, self.to_core = self.context.socket(zmq.PULL), self.context.socket(zmq.PUSH)
        commands.bind(f"inproc://commands-{name}")
        self.to_core.connect(f"inproc://commands-{name}")
        outputs, self.from_core = self.context.socket(zmq.PUSH), self.context.socket(zmq.PULL)
        outputs.bind(f"inproc://outputs-{name}")
        self.from_core.connect(f"inproc://outputs-{name}")
        self.core = EngineCore(engine, recorder or MetricRecorder(), commands, Channel(outputs))

    def send(self, message: wire.ToCore) -> None:
        self.to_core.send(wire.encoder.encode(message))

    def receive(self, timeout_s: float = 30.0) -> wire.FromCore:
        if not self.from_core.poll(int(timeout_s * 1000)):
            raise TimeoutError(f"the core sent nothing in {timeout_s} s")
        return wire.from_core.decode(self.from_core.recv())

    def close(self) -> None:
        self.context.destroy(linger=0)
