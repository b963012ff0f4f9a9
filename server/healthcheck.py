"""``python -m server.healthcheck``: the container's readiness probe (the Dockerfile's and docker-compose's).

It asks ``/ready`` on the loopback port the server listens on (``GPTSERVE_PORT``, default 8000), or on its Unix
socket when ``GPTSERVE_UDS`` names one, over HTTPS when ``GPTSERVE_SSL_CERTFILE`` is set. It does not check the
certificate: that names the host clients use, not 127.0.0.1, and the probe talks to the server in its own
container. With ``GPTSERVE_SSL_CERT_REQS`` asking clients for certificates the probe has none to give; override
the healthcheck there (deploy/README.md).
Exit status 0: ready; 1: anything else, which is what Docker counts as unhealthy.
"""

from __future__ import annotations

import http.client
import os
import socket
import ssl
import sys


class _UnixSocketConnection(http.client.HTTPConnection):
    """HTTP over a Unix domain socket (TLS too, when ``context`` is given)."""

    def __init__(self, path: str, timeout: float, context: ssl.SSLContext | None) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path, self.context = path, context

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.path)
        self.sock = self.context.wrap_socket(sock, server_hostname="localhost") if self.context else sock


def probe(environ: dict[str, str], timeout: float = 4.0) -> int:
    tls = bool(environ.get("GPTSERVE_SSL_CERTFILE"))
    context = ssl._create_unverified_context() if tls else None
    uds = environ.get("GPTSERVE_UDS", "").strip()
    connection: http.client.HTTPConnection
    if uds:
        where = f"unix socket {uds}"
        connection = _UnixSocketConnection(uds, timeout, context)
    else:
        where = f"127.0.0.1:{environ.get('GPTSERVE_PORT', '8000')}"
        host, port = "127.0.0.1", int(environ.get("GPTSERVE_PORT", "8000"))
        connection = (http.client.HTTPSConnection(host, port, timeout=timeout, context=context) if tls
                      else http.client.HTTPConnection(host, port, timeout=timeout))
    try:
        connection.request("GET", "/ready")
        status = connection.getresponse().status
    except (OSError, http.client.HTTPException) as e:  # refused, timed out, a TLS failure, a broken answer
        print(f"{where}/ready: {e}", file=sys.stderr)
        return 1
    finally:
        connection.close()
    if status != 200:
        print(f"{where}/ready: HTTP {status}", file=sys.stderr)
    return 0 if status == 200 else 1


if __name__ == "__main__":
    sys.exit(probe(dict(os.environ)))
