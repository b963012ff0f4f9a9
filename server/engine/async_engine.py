"""The bridge between asyncio request handlers and the engine thread.

Handlers never touch the engine: they post commands (add, abort, stop a choice) to a thread-safe queue and
read their choices' outputs from an asyncio queue that the engine thread fills with call_soon_threadsafe.
The engine thread applies pending commands between steps, so an abort takes effect within one step; a new
request also flags ``_arrived``, which a running step of decodes asks between layers (engine.step).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable

from models.loader import LoadedModel
from server.engine.engine import EngineConfig, EngineStats, LLMEngine, Output
from server.engine.errors import EngineUnavailable, QueueFull, RequestRejected
from server.engine.outputs import ChoiceOutput
from server.engine.sampling_params import GrammarSpec, SamplingParams
from server.engine.step_metrics import StepMetrics

log = logging.getLogger("gptserve.engine")

Command = Callable[[LLMEngine], list[Output] | None]


class AsyncEngine:
    def __init__(self, name: str, loaded: LoadedModel, config: EngineConfig, metrics=None) -> None:
        self.name = name
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.family = loaded.family
        self.config = config
        self.engine = LLMEngine(loaded, config, StepMetrics(metrics))
        self.max_model_len = self.engine.max_model_len
        self._commands: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._arrived = threading.Event()  # a request was posted since the engine thread last took commands
        self._streams: dict[str, asyncio.Queue[ChoiceOutput]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._accepting = False
        self._stop = False
        self._failure: BaseException | None = None
        self._pending = 0  # sequences (n per request) posted but not yet finished, for --max-queue
        self._stats = self.engine.stats()

    # -- lifecycle ------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.loaded.model.attach(self.engine.cache, self.fail)  # tensor parallel: the other ranks allocate their KV too
        self._accepting = True
        self._thread = threading.Thread(target=self._run, name=f"engine-{self.name}", daemon=True)
        self._thread.start()

    async def shutdown(self, timeout: float = 30.0) -> None:
        """Stop admitting, let in-flight requests finish for up to ``timeout`` seconds, abort the rest."""
        self._accepting = False
        deadline = asyncio.get_running_loop().time() + timeout
        while self._streams and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        for request_id in list(self._streams):
            self._post(lambda engine, rid=request_id: engine.abort(rid))
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10.0)
        await asyncio.to_thread(self.loaded.model.stop)

    def abort_all(self) -> None:
        """The drain deadline passed: stop admitting and end every request in flight as aborted, which the
        routes answer with 503 (an error event then [DONE] on a stream)."""
        self._accepting = False
        for request_id in list(self._streams):
            self._post(lambda engine, rid=request_id: engine.abort(rid))

    @property
    def healthy(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._failure is None

    def fail(self, reason: str) -> None:
        """From any thread, when something the engine needs is gone (a tensor-parallel rank): /health turns 503
        and every in-flight and new request gets 503 now, even while the engine thread is blocked."""
        if self._failure is None:
            self._failure = EngineUnavailable(reason)
            self._loop.call_soon_threadsafe(self._fail_all, reason)

    def stats(self) -> EngineStats:
        """As of the end of the last step (read without locking the engine thread)."""
        return self._stats

    # -- requests ------------------------------------------------------------------------------------------
    def validate(self, prompt_len: int, params: SamplingParams, n: int) -> None:
        self.engine.validate(prompt_len, params, n)

    def default_max_tokens(self, prompt_len: int, n: int) -> int:
        """What max_tokens means when a request leaves it out: as many as the context and the KV cache hold."""
        return self.engine.admission.default_max_tokens(prompt_len, n)

    async def compile_grammar(self, spec: GrammarSpec | None) -> None:
        """Compile a request's grammar (or find it cached) off the event loop, so validate finds it ready: the
        first one also builds the tokenizer's grammar tables, seconds on o200k."""
        if spec is not None:
            await asyncio.to_thread(self.engine.grammars.compile, spec)

    def check_admission(self, num_seqs: int, param: str = "n", what: str = "sequences (prompts x n)") -> None:
        """Refuse, before anything is built for them, ``num_seqs`` sequences that could never be admitted (400:
        retrying cannot help) or that do not fit the queue now (429). Every sequence takes a place: n=128 is 128."""
        capacity = self.config.max_num_seqs + self.config.max_queue
        if num_seqs > capacity:
            raise RequestRejected(f"{num_seqs} {what} can never be admitted: model {self.name} holds at most "
                                  f"{capacity} sequences (--max-num-seqs + --max-queue)", param)
        if self._pending + num_seqs > capacity:  # every slot and queue place taken
            raise QueueFull(f"too many requests are waiting for model {self.name}; retry later")

    async def generate(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams, n: int = 1
    ) -> AsyncIterator[ChoiceOutput]:
        """Each choice's outputs as they come; closing the generator early aborts the request."""
        self.engine.validate(len(prompt_ids), params, n)
        if not self._accepting or not self.healthy:
            raise EngineUnavailable(f"model {self.name} is not accepting requests")
        self.check_admission(n)
        if request_id in self._streams:
            raise ValueError(f"duplicate request id {request_id}")
        stream: asyncio.Queue[ChoiceOutput] = asyncio.Queue()
        self._streams[request_id] = stream
        self._pending += n
        self._post(lambda engine: engine.add_request(request_id, prompt_ids, params, n))
        self._arrived.set()
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
            if unfinished:
                self._post(lambda engine: engine.abort(request_id))

    def stop_choice(self, request_id: str, index: int) -> None:
        self._post(lambda engine: engine.stop_choice(request_id, index))

    # -- engine thread ---------------------------------------------------------------------------------------
    def _post(self, command: Command) -> None:
        self._commands.put(command)
        self._wake.set()

    def _run(self) -> None:
        try:
            while not self._stop:
                self._arrived.clear()
                outputs = self._apply_commands()
                if self.engine.has_work:
                    outputs += self.engine.step(interrupt=self._arrived.is_set)
                self._stats = self.engine.stats()
                if outputs:
                    self._loop.call_soon_threadsafe(self._deliver, outputs)
                if not self.engine.has_work and self._commands.empty():
                    self._wake.wait()
                    self._wake.clear()
        except BaseException as exc:  # the engine is broken: fail everyone, turn /health red
            log.exception("engine thread for %s died", self.name)
            self._failure = exc
            self._loop.call_soon_threadsafe(self._fail_all, f"engine failed: {exc}")

    def _apply_commands(self) -> list[Output]:
        outputs: list[Output] = []
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return outputs
            outputs += command(self.engine) or []

    def _deliver(self, outputs: list[Output]) -> None:
        for request_id, out in outputs:
            stream = self._streams.get(request_id)
            if stream is not None:
                stream.put_nowait(out)

    def _fail_all(self, message: str) -> None:
        for stream in self._streams.values():
            stream.put_nowait(ChoiceOutput(-1, [], finish_reason="error", error=message))
