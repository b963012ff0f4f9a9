"""The front end's side of the boundary: one client per engine-core process, used by the request handlers.

``generate`` yields each choice's outputs, closing it early aborts the request in the core (its KV blocks are
freed there); ``validate`` and ``check_admission`` refuse requests up front from the numbers the core reported
when ready (the same Admission arithmetic); ``compile_grammar`` asks the core, which holds the grammar state. A
reader task turns the core's messages into outputs on each request's queue and replays the core's metric calls
into /metrics.

If the core fails, whether its process dies or it reports that its engine failed (CoreFailed: its loop raised,
a tensor-parallel rank died or hung; the core then exits by itself), every request gets 503 at once, /health
turns 503, and ``on_failure`` is called (the app then stops the server with a non-zero status, so an
orchestrator restarts it).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from collections import OrderedDict
from collections.abc import AsyncGenerator, Callable
from multiprocessing.connection import wait
from pathlib import Path

import zmq

from models.tokenizer import Tokenizer
from server.engine import core_messages as wire
from server.engine.core_startup import StartedCore
from server.engine.engine_stats import EngineStats
from server.engine.errors import EngineError, EngineUnavailable, QueueFull, RequestRejected
from server.engine.metric_events import MetricBacklog
from server.engine.outputs import ChoiceOutput
from server.engine.sampling_params import GRAMMAR_CACHE_SIZE, GrammarSpec, SamplingParams

log = logging.getLogger("gptserve.engine")

# Constraints not compiled before that may wait for the core's one compile thread (a wide regex takes seconds on
# o200k): one more is a 429, so no client can queue unbounded work. One compiled before is exempt, and the core
# answers it without the thread.
MAX_PENDING_COMPILES = 16
STOP_WAIT_S = 30.0  # how long a core told to shut down gets (its tensor-parallel ranks stop first) before a kill


class EngineCoreClient:
    def __init__(self, core: StartedCore, max_queue: int, metrics=None,
                 on_failure: Callable[[], None] | None = None) -> None:
        assert core.ready is not None and core.tokenizer is not None
        self.core = core
        self.name = core.name
        self.tokenizer: Tokenizer = core.tokenizer
        self.tokenizer_dir = Path(core.ready.tokenizer_dir)
        self.family = core.family
        self.admission = core.ready.admission
        self.max_model_len = self.admission.max_model_len
        self.hidden_size = core.ready.hidden_size
        self.max_queue = max_queue
        self.metric_backlog = MetricBacklog(metrics)  # the app flushes it before each /metrics exposition
        self.on_failure = on_failure
        self._stats = core.ready.stats
        self._streams: dict[str, asyncio.Queue[ChoiceOutput]] = {}
        self._compiles: dict[int, asyncio.Future[wire.GrammarCompiled]] = {}
        self._new_compiles = 0  # of those, the ones whose spec is not in _compiled
        self._compiled: OrderedDict[GrammarSpec, None] = OrderedDict()  # compiled lately, as the core's cache
        self._tickets = itertools.count()
        self._pending = 0  # sequences (n per request) posted but not yet finished, for --max-queue
        self._accepting = False
        self._stopping = False
        self._failure: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._outputs_fd: int | None = None

    # -- lifecycle ------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        fd = self._outputs_fd = int(self.core.outputs.getsockopt(zmq.FD))
        self._loop.add_reader(fd, self._read)
        self._loop.call_soon(self._read)  # what arrived before the reader was added raised no edge
        threading.Thread(target=self._watch, name=f"core-watch-{self.name}", daemon=True).start()
        self._accepting = True

    async def shutdown(self, timeout: float = 30.0) -> None:
        """Stop admitting, let in-flight requests finish for up to ``timeout`` seconds, abort the rest, then
        tell the core to stop and wait for it."""
        self._accepting = False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._streams and loop.time() < deadline and self._failure is None:
            await asyncio.sleep(0.05)
        self.abort_all()
        self._stopping = True
        process = self.core.process
        if process.is_alive():
            self._send(wire.Shutdown())
            await asyncio.to_thread(process.join, STOP_WAIT_S)
            if process.is_alive():
                log.error("the engine core for %s did not stop: killing it", self.name)
                process.kill()
                await asyncio.to_thread(process.join)
        if self._outputs_fd is not None:
            loop.remove_reader(self._outputs_fd)
            self._outputs_fd = None
        self.core.close()

    def abort_all(self) -> None:
        """The drain deadline passed: stop admitting and end every request in flight as aborted (503)."""
        self._accepting = False
        for request_id in list(self._streams):
            self._send(wire.Abort(request_id))

    @property
    def healthy(self) -> bool:
        return self._loop is not None and self._failure is None and self.core.process.is_alive()

    def fail(self, reason: str) -> None:
        """On the event loop, once: /health turns 503, every in-flight and new request gets 503 now, and
        ``on_failure`` stops the server (this model cannot serve again in this process)."""
        if self._failure is not None:
            return
        log.error("engine for %s failed: %s", self.name, reason)
        self._failure = reason
        for stream in self._streams.values():
            stream.put_nowait(ChoiceOutput(-1, [], finish_reason="error", error=reason))
        for future in self._compiles.values():
            if not future.done():
                future.set_exception(EngineUnavailable(reason))
        if self.on_failure is not None:
            self.on_failure()

    def stats(self) -> EngineStats:
        """As of the core's last report."""
        return self._stats

    # -- requests ------------------------------------------------------------------------------------------
    def validate(self, prompt_len: int, params: SamplingParams, n: int) -> None:
        """The admission checks; a grammar was checked by ``compile_grammar``, which every route awaits first."""
        self.admission.validate(prompt_len, params, n)

    def default_max_tokens(self, prompt_len: int, n: int) -> int:
        return self.admission.default_max_tokens(prompt_len, n)

    async def compile_grammar(self, spec: GrammarSpec | None) -> None:
        """Have the core compile a request's grammar (or find it in its cache, one round trip) before the request
        is admitted: a schema that cannot be compiled is a 400 here, and one more than MAX_PENDING_COMPILES
        waiting a 429."""
        if spec is None:
            return
        self._raise_if_unavailable()
        new = spec not in self._compiled
        if new and self._new_compiles >= MAX_PENDING_COMPILES:
            raise QueueFull(f"{MAX_PENDING_COMPILES} new constraints are compiling for model {self.name}; retry later")
        ticket = next(self._tickets)
        future = self._compiles[ticket] = asyncio.get_running_loop().create_future()
        self._new_compiles += new
        self._send(wire.CompileGrammar(ticket, spec))
        try:
            answer = await future
        finally:
            self._compiles.pop(ticket, None)
            self._new_compiles -= new
        if answer.error is None:
            self._compiled[spec] = None
            self._compiled.move_to_end(spec)
            if len(self._compiled) > GRAMMAR_CACHE_SIZE:
                self._compiled.popitem(last=False)
        if answer.error is not None and answer.param is not None:
            raise RequestRejected(answer.error, answer.param)
        if answer.error is not None:
            raise EngineError(answer.error)

    def check_admission(self, num_seqs: int, param: str = "n", what: str = "sequences (prompts x n)") -> None:
        """Refuse ``num_seqs`` sequences that could never be admitted (400) or that do not fit the queue now (429)."""
        capacity = self.admission.max_num_seqs + self.max_queue
        if num_seqs > capacity:
            raise RequestRejected(f"{num_seqs} {what} can never be admitted: model {self.name} holds at most "
                                  f"{capacity} sequences (--max-num-seqs + --max-queue)", param)
        if self._pending + num_seqs > capacity:
            raise QueueFull(f"too many requests are waiting for model {self.name}; retry later")

    async def generate(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams, n: int = 1
    ) -> AsyncGenerator[ChoiceOutput, None]:
        """Each choice's outputs as they come; closing the generator early aborts the request in the core."""
        self.validate(len(prompt_ids), params, n)
        self._raise_if_unavailable()
        self.check_admission(n)
        if request_id in self._streams:
            raise ValueError(f"duplicate request id {request_id}")
        stream: asyncio.Queue[ChoiceOutput] = asyncio.Queue()
        self._streams[request_id] = stream
        self._pending += n
        self._send(wire.AddRequest(request_id, prompt_ids, params, n))
        unfinished = n
        try:
            while unfinished:
                out = await stream.get()
                if out.index < 0:
                    raise EngineUnavailable(out.error or "engine failed")
                if out.finish_reason is not None:
                    unfinished -= 1
                yield out
        finally:
            self._streams.pop(request_id, None)
            self._pending -= n
            if unfinished and self._failure is None:
                self._send(wire.Abort(request_id))

    def stop_choice(self, request_id: str, index: int) -> None:
        self._send(wire.StopChoice(request_id, index))

    # -- the core's messages -----------------------------------------------------------------------------
    def _raise_if_unavailable(self) -> None:
        if not self._accepting or not self.healthy:
            raise EngineUnavailable(f"model {self.name} is not accepting requests")

    def _send(self, message: wire.ToCore) -> None:
        """Never blocks: a PUSH socket blocks when no core is connected, and a core that exits (or is exiting after
        a failure) has closed its end; what it would have been told no longer matters."""
        try:
            self.core.commands.send(wire.encoder.encode(message), zmq.NOBLOCK, copy=False)
        except zmq.Again:
            pass

    def _read(self) -> None:
        """Called by the event loop when the outputs socket's FD is readable. ZeroMQ's FD signals a change of
        state (edge-triggered), not a message, so every message waiting is read now. A plain callback, not a
        zmq.asyncio task: its futures cost about half the front end's CPU per streamed token (bench/NOTES.md).
        After a message, ZMQ_EVENTS says whether another waits (reading it re-arms the edge): cheaper than a recv
        that raises zmq.Again. Messages are a few hundred bytes a step, for which a copy beats a zmq.Frame."""
        outputs = self.core.outputs
        while True:
            try:
                data = outputs.recv(zmq.NOBLOCK)
            except zmq.Again:  # woken with nothing new
                return
            message = wire.from_core.decode(data)
            if isinstance(message, wire.StepOutputs):
                self._deliver(message)
            elif isinstance(message, wire.GrammarCompiled):
                future = self._compiles.get(message.ticket)
                if future is not None and not future.done():
                    future.set_result(message)
            elif isinstance(message, wire.CoreFailed):
                self.fail(message.reason)
            if not int(outputs.get(zmq.EVENTS)) & zmq.POLLIN:
                return

    def _deliver(self, message: wire.StepOutputs) -> None:
        self.metric_backlog.add(message.events)
        self._stats = message.stats
        for request_id, out in message.outputs:
            stream = self._streams.get(request_id)
            if stream is not None:
                stream.put_nowait(out)

    def _watch(self) -> None:
        """A thread waiting on the core's process sentinel: a core that exits unasked fails its model at once
        (if it has not said why already, with CoreFailed)."""
        process = self.core.process
        wait([process.sentinel])
        if not self._stopping and self._loop is not None:
            process.join(1.0)
            self._loop.call_soon_threadsafe(self._died, process.exitcode)

    def _died(self, exitcode: int | None) -> None:
        if self._stopping:
            return
        self.fail(f"the engine core process for model {self.name} (pid {self.core.process.pid}) exited with "
                  f"code {exitcode}")
