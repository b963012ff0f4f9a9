"""The engine core's process, one per served model: it loads the weights, owns the LLMEngine (scheduler, block
manager, model runner, sampler and grammar state) and steps it, fed by the front end over ZeroMQ.

The loop: take every command waiting (add, abort, stop a choice, compile a grammar, shut down), run one step if
there is work, send its outputs with the metric calls it made and the scheduler's load, and block on the socket
when idle. A command arriving during a step of decodes may interrupt it between layers (engine.step).

The process ignores SIGINT and SIGTERM: a terminal's Ctrl-C reaches the whole process group, and the front end
must drain its requests first; it sends Shutdown when done. If the front end dies instead, the core exits
within a second (it watches its parent), so no core outlives its server.

If the engine fails (the loop raises, or a tensor-parallel watchdog calls ``EngineCore.fail``), the core sends
CoreFailed, stops its ranks and exits 1 within ``FAIL_EXIT_S``, even when its loop is stuck inside a step: the
front end treats that as it treats a core that died (503s, then the server exits non-zero).
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import os
import signal
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict
from multiprocessing.connection import wait
from pathlib import Path

import zmq

from models.loader import LoadedModel, load_model
from server.config import ServerConfig
from server.engine import core_messages as wire
from server.engine.engine import LLMEngine, Output
from server.engine.errors import EngineError, RequestRejected
from server.engine.host_memory import keep_freed_memory_in_heap, release_free_heap
from server.engine.metric_events import MetricRecorder
from server.engine.outputs import ChoiceOutput
from server.engine.sampling_params import GrammarSpec
from server.engine.step_metrics import StepMetrics

log = logging.getLogger("gptserve.core")
_pairs = itertools.count()

FAIL_EXIT_S = 1.5  # after a failure, the longest the core lives on (a step stuck in a collective, a compile)
COMPILE_POLL_MS = 10  # while a grammar compiles off the loop, how often an idle loop looks for its result


def load_served_model(directory: Path, config: ServerConfig) -> LoadedModel:
    """One model's weights, here or (tensor parallel) sharded over ranks this process starts or joins."""
    if config.parallel.tensor_parallel_size > 1:
        from server.engine.distributed import launch

        return launch(directory, config)
    return load_model(directory, **asdict(config.load), defer_tokenizer=True)  # the front end holds it built


class Channel:
    """The socket to the front end, sendable from the loop and from a failure callback's thread."""

    def __init__(self, socket: zmq.Socket) -> None:
        self.socket = socket
        self.lock = threading.Lock()

    def send(self, message: wire.FromCore) -> None:
        data = wire.encoder.encode(message)
        with self.lock:
            self.socket.send(data, copy=False)


class EngineCore:
    def __init__(self, engine: LLMEngine, recorder: MetricRecorder, commands: zmq.Socket, channel: Channel,
                 exit_deadline_s: float | None = None) -> None:
        """``exit_deadline_s``: after a failure, end the process this long after if it has not ended by then
        (None in a test that drives the loop in its own process)."""
        self.engine = engine
        self.recorder = recorder
        self.commands = commands
        self.channel = channel
        self.stopping = False
        self._compiler = ThreadPoolExecutor(1, thread_name_prefix="grammar")  # seconds on o200k: off the loop
        self._compiles: dict[int, Future] = {}
        self._sent_stats = engine.stats()
        self._taken: list[wire.ToCore] = []  # commands received during a step, applied after it
        self._arrived = False  # one of them is a new request
        self.failure: str | None = None
        self._exit_deadline_s = exit_deadline_s
        self._failing = threading.Lock()
        self._wake_in, self._wake_out = _socket_pair(commands.context)  # fail() wakes an idle loop
        self._idle = zmq.Poller()
        self._idle.register(commands, zmq.POLLIN)
        self._idle.register(self._wake_in, zmq.POLLIN)

    def run(self) -> None:
        """Step until Shutdown or a failure (then ``failure`` says why and the process must exit 1)."""
        loaded = self.engine.loaded
        loaded.model.attach(self.engine.cache, self.fail)  # tensor parallel: the other ranks allocate their KV too
        self.channel.send(wire.Ready(self.engine.admission, self._sent_stats, loaded.family,
                                     str(loaded.tokenizer_dir), loaded.hidden_size))
        try:
            while not self.stopping and self.failure is None:
                outputs = self._apply_commands()
                if self.engine.has_work and not self.stopping:
                    outputs += self.engine.step(interrupt=self._request_arrived)
                self._report(outputs)
                self._answer_compiles()
                if not self.engine.has_work and not self.stopping and not self._taken and self.failure is None:
                    self._idle.poll(COMPILE_POLL_MS if self._compiles else None)
        except BaseException as exc:  # the engine is broken: every request gets 503, the server restarts
            log.exception("the engine core loop failed")
            self.fail(f"engine failed: {exc}")
        finally:
            # Compiles still queued would hold the process's exit (its pool's workers are joined) for seconds each.
            self._compiler.shutdown(wait=False, cancel_futures=True)
            loaded.model.stop()

    def fail(self, reason: str) -> None:
        """From any thread (the loop, a tensor-parallel watchdog): the engine cannot serve again. The front end
        answers 503 and stops the server; the loop ends, and the process is ended after ``exit_deadline_s`` if
        the loop is stuck (a step waiting on a collective)."""
        with self._failing:
            if self.failure is not None:
                return
            self.failure = reason
            log.error("the engine core fails: %s", reason)
            self.channel.send(wire.CoreFailed(reason))
            self._wake_out.send(b"")
        if self._exit_deadline_s is not None:
            why = f"the failed engine core is still running after {self._exit_deadline_s} s"
            deadline = threading.Timer(self._exit_deadline_s, _exit_now, args=(why,))
            deadline.daemon = True
            deadline.start()

    def _request_arrived(self) -> bool:
        """Asked between a decode step's layers: only a new request is worth giving the step up for (an abort or
        a stop waits for the step's end), so the commands are taken off the socket here and kept in order."""
        while self.commands.poll(0):
            message = self._receive()
            self._taken.append(message)
            self._arrived = self._arrived or isinstance(message, wire.AddRequest)
        return self._arrived

    def _receive(self) -> wire.ToCore:
        return wire.to_core.decode(self.commands.recv(copy=False).buffer)

    def _apply_commands(self) -> list[Output]:
        outputs: list[Output] = []
        taken, self._taken, self._arrived = self._taken, [], False
        while self.commands.poll(0):
            taken.append(self._receive())
        for message in taken:
            if isinstance(message, wire.AddRequest):
                outputs += self._add(message)
            elif isinstance(message, wire.Abort):
                outputs += self.engine.abort(message.request_id)
            elif isinstance(message, wire.StopChoice):
                outputs += self.engine.stop_choice(message.request_id, message.index)
            elif isinstance(message, wire.CompileGrammar) and self.engine.grammar_compiled(message.spec):
                self.channel.send(wire.GrammarCompiled(message.ticket))  # never behind another's slow compile
            elif isinstance(message, wire.CompileGrammar):
                self._compiles[message.ticket] = self._compiler.submit(self._compile, message.spec)
            elif isinstance(message, wire.Shutdown):
                self.stopping = True
        return outputs

    def _compile(self, spec: GrammarSpec) -> object:
        """On the compile thread, with the first call building the tokenizer's grammar tables (seconds on o200k)."""
        return self.engine.grammars.compile(spec)

    def _add(self, message: wire.AddRequest) -> list[Output]:
        try:
            self.engine.add_request(message.request_id, message.prompt_ids, message.params, message.n)
        except EngineError as exc:  # its grammar cannot be compiled after all: the request fails, nothing else
            return [(message.request_id, ChoiceOutput(i, [], finish_reason="error", error=exc.message))
                    for i in range(message.n)]
        return []

    def _report(self, outputs: list[Output]) -> None:
        events = self.recorder.take()
        stats = self.engine.stats()
        if outputs or events or stats != self._sent_stats:
            self._sent_stats = stats
            self.channel.send(wire.StepOutputs(outputs, events, stats))

    def _answer_compiles(self) -> None:
        for ticket, future in list(self._compiles.items()):
            if not future.done():
                continue
            del self._compiles[ticket]
            exc = future.exception()
            if isinstance(exc, RequestRejected):
                self.channel.send(wire.GrammarCompiled(ticket, exc.message, exc.param))
            elif exc is not None:
                self.channel.send(wire.GrammarCompiled(ticket, f"compiling the grammar failed: {exc}"))
            else:
                self.channel.send(wire.GrammarCompiled(ticket))


def run_core(name: str, directory: Path, config: ServerConfig, commands_address: str, outputs_address: str) -> None:
    """The process's entry point (multiprocessing spawn): load, report Ready (or why not), then step until told."""
    keep_freed_memory_in_heap()  # a spawned interpreter starts with glibc's defaults: tune before any thread exists
    for stop_signal in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop_signal, signal.SIG_IGN)
    from server.logging_setup import configure_logging

    configure_logging(config.log_level)
    threading.Thread(target=_exit_with_parent, name="parent-watch", daemon=True).start()
    context = zmq.Context()
    commands, outputs = context.socket(zmq.PULL), context.socket(zmq.PUSH)
    outputs.setsockopt(zmq.SNDHWM, 0)  # never drop or block on outputs: the front end reads them all
    commands.connect(commands_address)
    outputs.connect(outputs_address)
    channel = Channel(outputs)
    log.info("loading model", extra={"model": name, "directory": str(directory)})
    try:
        engine, recorder = _build_engine(directory, config)
    except (OSError, ValueError) as exc:  # CheckpointError, TokenizerError, missing files, bad flags
        channel.send(wire.LoadFailed(str(exc), bad_input=True))
        _close(context)
        raise SystemExit(2) from None
    except BaseException as exc:
        log.exception("the engine core for %s failed to start", name)
        channel.send(wire.LoadFailed(f"{type(exc).__name__}: {exc}", bad_input=False))
        _close(context)
        raise SystemExit(1) from None
    release_free_heap()  # what loading freed inside the heap
    log.info("engine core ready", extra={"model": name, "pid": os.getpid()})
    core = EngineCore(engine, recorder, commands, channel, exit_deadline_s=FAIL_EXIT_S)
    core.run()
    _close(context)
    if core.failure is not None:  # at once: a failed tensor-parallel group can hang the interpreter's teardown
        _exit_now("its engine failed")


def _build_engine(directory: Path, config: ServerConfig) -> tuple[LLMEngine, MetricRecorder]:
    if config.seed is not None:
        import torch

        torch.manual_seed(config.seed)
    recorder = MetricRecorder()
    loaded = load_served_model(directory, config)
    return LLMEngine(loaded, config.engine, StepMetrics(recorder)), recorder  # type: ignore[arg-type]


def _close(context: zmq.Context) -> None:
    context.destroy(linger=1000)  # what was sent still reaches the front end


def _socket_pair(context: zmq.Context) -> tuple[zmq.Socket, zmq.Socket]:
    """Two connected inproc sockets: what is sent on the second arrives on the first."""
    address = f"inproc://core-wake-{id(context)}-{next(_pairs)}"
    receiving, sending = context.socket(zmq.PAIR), context.socket(zmq.PAIR)
    receiving.bind(address)
    sending.connect(address)
    return receiving, sending


def _exit_with_parent() -> None:
    """Blocks on the spawning front end's sentinel (a pipe it holds open), so a front end killed outright takes
    its core with it, and the thread never wakes the CPU before then."""
    parent = multiprocessing.parent_process()
    assert parent is not None, "the engine core runs in a process spawned by the front end"
    wait([parent.sentinel])
    _exit_now(f"the front end (pid {parent.pid}) is gone")


def _exit_now(why: str) -> None:
    """From any thread: kill the tensor-parallel ranks this process spawned, then exit 1 at once."""
    log.error("%s: the engine core exits", why)
    for child in multiprocessing.active_children():
        child.kill()
    os._exit(1)
