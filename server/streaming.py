"""Server-sent events as OpenAI streams them: completions and chat send one ``data: {json}`` per chunk and
``data: [DONE]`` last; the Responses API names each event by its type (``event: response.created``) and sends
no [DONE]."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable

from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from server.engine.errors import EngineError
from server.protocol import (
    APIError,
    ChatCompletionChunk,
    CompletionResponse,
    ErrorObject,
    ErrorResponse,
    StreamOptions,
    Usage,
)
from server.routes.engine_calls import cancel_on_disconnect

log = logging.getLogger("gptserve.http")

DONE = b"data: [DONE]\n\n"

UsageSoFar = Callable[[], Usage]


def sse_event(chunk: BaseModel) -> bytes:
    return b"data: " + chunk.model_dump_json().encode() + b"\n\n"


async def prime(request: Request, chunks: AsyncGenerator[BaseModel, None]) -> AsyncGenerator[BaseModel, None]:
    """Wait for the first chunk before answering, so QueueFull and friends still become their HTTP status."""
    try:
        first = await cancel_on_disconnect(request, anext(chunks))
    except StopAsyncIteration:
        return chunks
    except BaseException:
        await chunks.aclose()
        raise
    return _prepend(first, chunks)


async def _prepend(first: BaseModel, rest: AsyncGenerator[BaseModel, None]) -> AsyncGenerator[BaseModel, None]:
    try:
        yield first
        async for chunk in rest:
            yield chunk
    finally:
        await rest.aclose()


def includes_usage(options: StreamOptions | None, forced: bool) -> bool:
    """Whether a stream ends with a usage chunk: asked for by ``include_usage``, or for every stream on a server
    started with --enable-force-include-usage (``forced``), as vLLM decides it."""
    return forced or (options is not None and options.include_usage)


def continuous_usage(options: StreamOptions | None, forced: bool, usage: UsageSoFar) -> UsageSoFar | None:
    """vLLM's ``continuous_usage_stats``: usage on every chunk, and only on a stream that includes usage."""
    if options is not None and options.continuous_usage_stats and includes_usage(options, forced):
        return usage
    return None


def sse_response(chunks: AsyncGenerator[BaseModel, None], usage: UsageSoFar | None = None) -> StreamingResponse:
    """``usage``, when given, fills every completion or chat chunk's usage with the counts at the moment it is
    sent."""
    return _event_stream(_frames(chunks, usage))


def named_sse_response(events: AsyncGenerator[BaseModel, None]) -> StreamingResponse:
    """The Responses API's stream: ``events`` each have a ``type``, which names the event."""
    return _event_stream(_named_frames(events))


def _event_stream(frames: AsyncIterator[bytes]) -> StreamingResponse:
    return StreamingResponse(frames, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _frames(chunks: AsyncGenerator[BaseModel, None], usage: UsageSoFar | None) -> AsyncIterator[bytes]:
    """Once the 200 is sent an error can only be reported in the stream: as an error event, then [DONE].

    A client disconnect cancels this generator; closing ``chunks`` then aborts the engine requests.
    """
    try:
        async for chunk in chunks:
            if (usage is not None and isinstance(chunk, CompletionResponse | ChatCompletionChunk)
                    and chunk.usage is None):
                chunk.usage = usage()
            yield sse_event(chunk)
    except Exception as e:  # noqa: BLE001 - whatever went wrong, the client gets an error event, not a cut stream
        yield sse_event(ErrorResponse(error=stream_error(e)))
    finally:
        await chunks.aclose()
    yield DONE


async def _named_frames(events: AsyncGenerator[BaseModel, None]) -> AsyncIterator[bytes]:
    """An error after the 200 is an ``error`` event, in OpenAI's fields and (so that the OpenAI SDK raises it) with
    the error object too; the stream then ends."""
    sequence = 0
    try:
        async for event in events:
            fields = event.model_extra or {}  # a Responses event: its fields are all extra (server.routes.responses)
            sequence = fields["sequence_number"] + 1
            yield b"event: " + fields["type"].encode() + b"\n" + sse_event(event)
    except Exception as e:  # noqa: BLE001 - whatever went wrong, the client gets an error event, not a cut stream
        error = stream_error(e)
        body = {"type": "error", "code": error.code or error.type, "message": error.message, "param": error.param,
                "sequence_number": sequence, "error": error.model_dump()}
        yield b"event: error\ndata: " + json.dumps(body).encode() + b"\n\n"
    finally:
        await events.aclose()


def stream_error(e: Exception) -> ErrorObject:
    if isinstance(e, APIError):
        return e.error
    if isinstance(e, EngineError):
        return ErrorObject(message=e.message, type=e.type, param=e.param)
    log.exception("streaming failed", exc_info=e)
    return ErrorObject(message="internal server error", type="internal_error")
