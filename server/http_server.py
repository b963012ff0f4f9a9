"""The app under uvicorn: limits on connections and on clients that send slowly, and SIGTERM's bounded drain.

uvicorn bounds an idle keep-alive connection (``--keep-alive-timeout``) and, with ``limit_concurrency``
(``--max-connections``), answers 503 once that many connections are open. The request headers' deadline
(``--header-timeout``) is server.http_protocols'; the body has its own in the app's Gateway (``--body-timeout``).
uvicorn runs on uvloop, which it picks when installed (a dependency, as httptools is). With ``--ssl-certfile`` it
serves HTTPS (settings checked at start-up by server.tls).

On SIGTERM uvicorn stops listening and waits for in-flight requests. After ``--drain-timeout`` seconds every
request still in an engine is aborted, so each ends as the contract says (a 503 error object, or an error event
then ``[DONE]`` on a stream) rather than being cancelled mid-write by uvicorn, which would cut streams and answer
a plain-text 500.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import uvicorn

from server.config import HTTPConfig, ServerConfig
from server.http_protocols import guarded_protocol
from server.tls import CertificateRefresher

UVICORN_CIPHERS = "TLSv1"  # uvicorn.Config's default cipher list, kept without --ssl-ciphers
CUT_GRACE_S = 5.0  # after the drain deadline's aborts, how long requests get to write their 503s and [DONE]s


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose shutdown calls ``cut`` once ``drain_timeout`` seconds have passed."""

    def __init__(self, config: uvicorn.Config, drain_timeout: float, cut: Callable[[], None],
                 refresh_tls: HTTPConfig | None = None) -> None:
        """``refresh_tls``: the settings whose files are reloaded when they change (--enable-ssl-refresh)."""
        super().__init__(config)
        self.drain_timeout = drain_timeout
        self.cut = cut
        self.refresh_tls = refresh_tls
        self._refresher: asyncio.Task | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.refresh_tls is not None and self.config.ssl is not None:  # the context every handshake uses
            self._refresher = asyncio.create_task(CertificateRefresher(self.config.ssl, self.refresh_tls).run())

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
        deadline = asyncio.get_running_loop().call_later(self.drain_timeout, self.cut)
        try:
            await super().shutdown(sockets)
        finally:
            deadline.cancel()


def serve(app: Callable[..., Any], config: ServerConfig, cut: Callable[[], None]) -> None:
    """Run the ASGI ``app`` until SIGTERM/SIGINT; ``cut`` aborts whatever is still in flight at the drain deadline."""
    # uvicorn annotates both timeouts as int but hands them to call_later and wait_for, which take fractions.
    uvicorn_config = uvicorn.Config(
        app, host=config.http.host, port=config.http.port, uds=config.http.uds, log_config=None, access_log=False,
        log_level=config.uvicorn_log_level or config.log_level, http=guarded_protocol(config.http.header_timeout),
        limit_concurrency=config.http.max_connections,
        timeout_keep_alive=config.http.keep_alive_timeout,  # type: ignore[arg-type]
        timeout_graceful_shutdown=config.http.drain_timeout + CUT_GRACE_S,  # type: ignore[arg-type]
        ssl_certfile=config.http.ssl_certfile, ssl_keyfile=config.http.ssl_keyfile,
        ssl_ca_certs=config.http.ssl_ca_certs, ssl_cert_reqs=config.http.ssl_cert_reqs,
        ssl_ciphers=config.http.ssl_ciphers or UVICORN_CIPHERS,
    )
    try:
        refresh = config.http if config.http.enable_ssl_refresh else None
        DrainingServer(uvicorn_config, config.http.drain_timeout, cut, refresh).run()
    finally:
        if config.http.uds:  # as uvicorn.run does: a socket left behind would look like a server to clients
            Path(config.http.uds).unlink(missing_ok=True)
