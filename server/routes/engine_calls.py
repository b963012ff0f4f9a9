"""Running one HTTP request's prompts on an engine: outputs of every prompt merged, and aborted on disconnect."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import Literal, TypeVar

from fastapi import Request

from server.engine.core_client import EngineCoreClient
from server.engine.errors import EngineUnavailable
from server.engine.outputs import ChoiceOutput
from server.engine.sampling_params import SamplingParams
from server.protocol import APIError

T = TypeVar("T")


@dataclass(slots=True)
class PromptJob:
    prompt_ids: list[int]
    params: SamplingParams


def raise_if_failed(output: ChoiceOutput) -> Literal["stop", "length"] | None:
    """A choice the engine ended by failing its step (500) or aborting it at shutdown (503) is an HTTP error;
    any other output's finish reason is returned, as a client may see it (None: not finished)."""
    match output.finish_reason:
        case None:
            return None
        case "stop":
            return "stop"
        case "length":
            return "length"
        case "error":
            raise APIError(500, output.error or "the engine failed this request", type="internal_error")
        case "abort":
            raise EngineUnavailable("the request was aborted: the server is shutting down")
    raise ValueError(f"unknown finish reason {output.finish_reason!r}")


class ClientDisconnected(Exception):
    """The client went away before the answer was ready; its requests were aborted."""


class MergedOutputs:
    """One ``engine.generate`` per prompt, read concurrently; yields ``(prompt_index, ChoiceOutput)``.

    Leaving the ``async with`` block closes every generator still running, which aborts its request in the
    engine and frees its KV blocks. A prompt whose choices all ended here (a stop string) is closed at once:
    the engine reports nothing more for a choice ended by ``stop_choice``.

    One prompt (nearly every request) is read straight from its generator; several are read by one task each
    into a shared queue, which costs two more task switches per token.
    """

    def __init__(self, engine: EngineCoreClient, request_id: str, jobs: list[PromptJob], n: int) -> None:
        self.engine = engine
        self._request_ids = [f"{request_id}-{i}" for i in range(len(jobs))]
        self._jobs = jobs
        self._n = n
        self._queue: asyncio.Queue[tuple[int, ChoiceOutput | BaseException | None]] = asyncio.Queue()
        self._tasks: list[asyncio.Task] = []
        self._single: AsyncGenerator[ChoiceOutput, None] | None = None
        self._open_choices = [n] * len(jobs)

    async def __aenter__(self) -> MergedOutputs:
        if len(self._jobs) == 1:
            self._single = self._generate(0)
        else:
            self._tasks = [asyncio.create_task(self._pump(i)) for i in range(len(self._jobs))]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._single is not None:
            await self._single.aclose()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def __aiter__(self) -> AsyncIterator[tuple[int, ChoiceOutput]]:
        if self._single is not None:
            async for output in self._single:
                yield 0, output
                if self._open_choices[0] == 0:
                    return
            return
        running = len(self._tasks)
        while running:
            prompt_index, item = await self._queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield prompt_index, item

    def stop_choice(self, prompt_index: int, choice_index: int) -> None:
        """A stop string ended this choice on our side: tell the engine, and close the prompt once all are done."""
        self.engine.stop_choice(self._request_ids[prompt_index], choice_index)
        self.choice_finished(prompt_index)

    def choice_finished(self, prompt_index: int) -> None:
        self._open_choices[prompt_index] -= 1
        if self._open_choices[prompt_index] == 0 and self._tasks:
            self._tasks[prompt_index].cancel()

    def _generate(self, prompt_index: int) -> AsyncGenerator[ChoiceOutput, None]:
        job = self._jobs[prompt_index]
        return self.engine.generate(self._request_ids[prompt_index], job.prompt_ids, job.params, self._n)

    async def _pump(self, prompt_index: int) -> None:
        outputs = self._generate(prompt_index)
        try:
            async for output in outputs:
                self._queue.put_nowait((prompt_index, output))
        except Exception as e:  # QueueFull, EngineUnavailable...: the reader raises it
            self._queue.put_nowait((prompt_index, e))
        finally:
            await outputs.aclose()
            self._queue.put_nowait((prompt_index, None))


async def cancel_on_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await ``work`` unless the client disconnects first; then cancel it (aborting its engine requests)."""
    work_task = asyncio.ensure_future(work)
    watch_task = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({work_task, watch_task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch_task.cancel()
        if not work_task.done():
            work_task.cancel()
        await asyncio.gather(work_task, watch_task, return_exceptions=True)
    if work_task.cancelled():
        raise ClientDisconnected()
    return work_task.result()


async def _wait_for_disconnect(request: Request) -> None:
    # The body has been read, so the next ASGI message is the disconnect (or never comes).
    while (await request.receive())["type"] != "http.disconnect":
        pass
