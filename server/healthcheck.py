"""``python -m server.healthcheck``: the container's readiness probe (the Dockerfile's and docker-compose's).

It asks ``/ready`` on the loopback port the server listens on (``GPTSERVE_PORT``, default 8000), over HTTPS when
``GPTSERVE_SSL_CERTFILE`` is set. It does not check the certificate: that names the host clients use, not
127.0.0.1, and the probe talks to the server in its own container. With ``GPTSERVE_SSL_CERT_REQS`` asking clients
for certificates the probe has none to give; override the healthcheck there (deploy/README.md).
Exit status 0: ready; 1: anything else, which is what Docker counts as unhealthy.
"""

from __future__ import annotations

import os
import ssl
import sys
import urllib.request


def probe(environ: dict[str, str], timeout: float = 4.0) -> int:
    tls = bool(environ.get("GPTSERVE_SSL_CERTFILE"))
    url = f"{'https' if tls else 'http'}://127.0.0.1:{environ.get('GPTSERVE_PORT', '8000')}/ready"
    context = ssl._create_unverified_context() if tls else None
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as response:
            return 0 if response.status == 200 else 1
    except OSError as e:  # refused, timed out, a TLS failure, or an HTTP error status (urllib's HTTPError)
        print(f"{url}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(probe(dict(os.environ)))
