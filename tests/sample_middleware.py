"""Middleware as a deployment would bring it with --middleware (tests/test_vllm_serve_flags.py): a pure ASGI class
and an async HTTP function, each marking the answers it saw."""

from __future__ import annotations

from starlette.datastructures import MutableHeaders
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

NOT_MIDDLEWARE = "a module attribute that is neither a class nor an async function"


class StampHeader:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def stamped(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message).append("x-stamp-class", scope["path"])
            await send(message)

        await self.app(scope, receive, stamped if scope["type"] == "http" else send)


async def stamp(request: Request, call_next):
    response = await call_next(request)
    response.headers["x-stamp-function"] = "seen"
    return response
