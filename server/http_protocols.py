"""uvicorn's httptools (C) HTTP/1.1 protocol with a deadline and a size bound for each request's headers.

httptools, not uvicorn's pure-Python h11 protocol: it costs the front end less CPU per streamed token
(bench/NOTES.md, session 12). uvicorn has no deadline for a request's headers: a client that sends them a byte at a
time holds its connection, and one of the ``--max-connections`` places, forever. ``GuardedHttpToolsProtocol``
closes a connection whose request headers are not complete ``header_timeout`` seconds after its first byte (or
after the connection opened); an idle keep-alive connection between requests has uvicorn's own timer
(``--keep-alive-timeout``). llhttp bounds no header size either, so it answers 400 and closes, as h11 did, once a
request's unfinished headers pass ``MAX_HEADER_BYTES``.
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

MAX_HEADER_BYTES = 16 * 1024  # what uvicorn's h11 protocol allowed (h11_max_incomplete_event_size)


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline and a size bound for each request's headers.

    A request's headers are pending from the connection's opening, and from each message's first byte, until
    the parser calls ``on_headers_complete``; the deadline lives exactly that long.
    """

    header_timeout = 10.0  # replaced per server by ``guarded_protocol``

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_deadline: asyncio.TimerHandle | None = None
        self._header_bytes = 0
        self._arm_header_deadline()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._header_deadline is not None and not self.transport.is_closing():
            self._header_bytes += len(data)  # may count a body's tail too: a bound, not a measure
            if self._header_bytes > MAX_HEADER_BYTES:
                self.logger.warning("closing a connection whose request headers exceed %d bytes",
                                    MAX_HEADER_BYTES)
                self._cancel_header_deadline()
                self.send_400_response("Invalid HTTP request received.")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._header_deadline is None:
            self._arm_header_deadline()

    def on_headers_complete(self) -> None:
        self._cancel_header_deadline()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_deadline()
        super().connection_lost(exc)

    def _arm_header_deadline(self) -> None:
        self._header_bytes = 0
        self._header_deadline = self.loop.call_later(self.header_timeout, self._headers_too_slow)

    def _cancel_header_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_too_slow(self) -> None:
        self._header_deadline = None
        if not self.transport.is_closing():
            self.logger.warning("closing a connection whose request headers took over %.1fs",
                                self.header_timeout)
            self.transport.close()


def guarded_protocol(header_timeout: float) -> type[GuardedHttpToolsProtocol]:
    return type("GuardedHttpToolsProtocol", (GuardedHttpToolsProtocol,), {"header_timeout": header_timeout})
