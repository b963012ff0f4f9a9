"""Run ``python -m server`` on a free loopback port until /health answers, and stop it on exit.

The benchmarks keep its log next to their results; tests/server_process.py builds on it for the test suite.
"""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class BenchServer:
    """A context manager: starts gptserve with ``args``, waits for /health, terminates it on exit.

    ``tls``: the client context that trusts the server's certificate, when ``args`` serve HTTPS."""

    def __init__(
        self, args: list[str], log_path: Path, startup_timeout: float = 300.0, env: dict[str, str] | None = None,
        cwd: Path = PROJECT_ROOT, tls: ssl.SSLContext | None = None,
    ) -> None:
        self.port = free_port()
        self.base_url = f"{'http' if tls is None else 'https'}://127.0.0.1:{self.port}"
        self.verify: ssl.SSLContext | bool = True if tls is None else tls
        self.cmd = [sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", str(self.port), *args]
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
        self.log_path = log_path
        self.startup_timeout = startup_timeout
        self.cwd = cwd  # another checkout's root runs that checkout's server (bench.core_before_after)
        self._process: subprocess.Popen | None = None

    def __enter__(self) -> BenchServer:
        with self.log_path.open("wb") as log:
            self._process = subprocess.Popen(
                self.cmd, cwd=self.cwd, env=self.env, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"server exited with {self._process.returncode}: {self.failure_detail()}")
            try:
                if httpx.get(self.base_url + "/health", timeout=2.0, verify=self.verify).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.__exit__()
        raise TimeoutError(f"server not healthy after {self.startup_timeout}s: {self.failure_detail()}")

    def __exit__(self, *exc_info: object) -> None:
        if self._process is None or self._process.poll() is not None:
            return
        self._process.terminate()
        try:
            self._process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()

    @property
    def pid(self) -> int:
        assert self._process is not None, "not started"
        return self._process.pid

    def failure_detail(self) -> str:
        return f"see {self.log_path}"
