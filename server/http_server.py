"""The app under uvicorn: limits on connections and on clients that send slowly, and SIGTERM's bounded drain.

uvicorn bounds an idle keep-alive connection (``--keep-alive-timeout``) and, with ``limit_concurrency``
(``--max-connections``), answers 503 once that many connections are open. It has no deadline for a request's
headers: a client that sends them a byte at a time holds its connection, and one of those places, forever.
``GuardedH11Protocol`` closes a connection whose request headers are not complete ``--header-timeout`` seconds
after its first byte (or after it opened); the body has its own deadline in the app's Gateway (``--body-timeout``).

On SIGTERM uvicorn stops listening and waits for in-flight requests. After ``--drain-timeout`` seconds every
request still in an engine is aborted, so each ends as the contract says (a 503 error object, or an error event
then ``[DONE]`` on a stream) rather than being cancelled mid-write by uvicorn, which would cut streams and answer
a plain-text 500.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from server.config import ServerConfig

CUT_GRACE_S = 5.0  # after the drain deadline's aborts, how long requests get to write their 503s and [DONE]s


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request's headers."""

    header_timeout = 10.0  # replaced per server by ``guarded_protocol``

    # uvicorn's H11Protocol itself narrows asyncio's BaseTransport to Transport; this override follows it.
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_deadline: asyncio.TimerHandle | None = None
        self._arm_header_deadline()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is h11.IDLE:  # a request's headers are still arriving
            if self._header_deadline is None:
                self._arm_header_deadline()
        elif self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._header_deadline is not None:  # an idle keep-alive connection has uvicorn's own timer
            self._header_deadline.cancel()
            self._header_deadline = None

    def _arm_header_deadline(self) -> None:
        self._header_deadline = self.loop.call_later(self.header_timeout, self._headers_too_slow)

    def _headers_too_slow(self) -> None:
        self._header_deadline = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.logger.warning("closing a connection whose request headers took over %.1fs", self.header_timeout)
            self.transport.close()


def guarded_protocol(header_timeout: float) -> type[GuardedH11Protocol]:
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"header_timeout": header_timeout})


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose shutdown calls ``cut`` once ``drain_timeout`` seconds have passed."""

    def __init__(self, config: uvicorn.Config, drain_timeout: float, cut: Callable[[], None]) -> None:
        super().__init__(config)
        self.drain_timeout = drain_timeout
        self.cut = cut

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        deadline = asyncio.get_running_loop().call_later(self.drain_timeout, self.cut)
        try:
            await super().shutdown(sockets)
        finally:
            deadline.cancel()


def serve(app: Callable[..., Any], config: ServerConfig, cut: Callable[[], None]) -> None:
    """Run the ASGI ``app`` until SIGTERM/SIGINT; ``cut`` aborts whatever is still in flight at the drain deadline."""
    # uvicorn annotates both timeouts as int but hands them to call_later and wait_for, which take fractions.
    uvicorn_config = uvicorn.Config(
        app, host=config.http.host, port=config.http.port, log_config=None, access_log=False,
        log_level=config.log_level, http=guarded_protocol(config.http.header_timeout),
        limit_concurrency=config.http.max_connections,
        timeout_keep_alive=config.http.keep_alive_timeout,  # type: ignore[arg-type]
        timeout_graceful_shutdown=config.http.drain_timeout + CUT_GRACE_S,  # type: ignore[arg-type]
    )
    DrainingServer(uvicorn_config, config.http.drain_timeout, cut).run()
