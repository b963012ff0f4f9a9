"""Start ``python -m server ...`` on a free loopback port and wait until /health says it is serving.

Usage in a test module (module-scoped: one server per test file):

    @pytest.fixture(scope="module")
    def server(tiny_gpt2_dir):
        with ServerProcess(["--model", f"tiny={tiny_gpt2_dir}"]) as running:
            yield running
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, args: list[str], env: dict[str, str] | None = None, startup_timeout: float = 120.0) -> None:
        self.port = free_port()
        self.args = [sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", str(self.port),
                     "--device", "cpu", *args]
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
        self.startup_timeout = startup_timeout
        self.base_url = f"http://127.0.0.1:{self.port}"
        self._log = tempfile.NamedTemporaryFile(prefix="gptserve-", suffix=".log", delete=False)
        self._process: subprocess.Popen | None = None

    def __enter__(self) -> ServerProcess:
        self._process = subprocess.Popen(self.args, cwd=PROJECT_ROOT, env=self.env, stdout=self._log,
                                         stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"server exited with {self._process.returncode}:\n{self.log_text()}")
            try:
                if httpx.get(self.base_url + "/health", timeout=2.0).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.__exit__()
        raise TimeoutError(f"server not healthy after {self.startup_timeout}s:\n{self.log_text()}")

    def __exit__(self, *exc_info: object) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._log.close()

    @property
    def v1(self) -> str:
        return self.base_url + "/v1"

    def log_text(self) -> str:
        self._log.flush()
        return Path(self._log.name).read_text(errors="replace")

    def health(self) -> dict:
        return httpx.get(self.base_url + "/health", timeout=10.0).json()
