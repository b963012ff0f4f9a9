"""Start ``python -m server ...`` on a free loopback port and wait until /health says it is serving.

Usage in a test module (module-scoped: one server per test file):

    @pytest.fixture(scope="module")
    def server(tiny_gpt2_dir):
        with ServerProcess(["--model", f"tiny={tiny_gpt2_dir}"]) as running:
            yield running
"""

from __future__ import annotations

import ssl
import tempfile
import time
from pathlib import Path

import httpx

from bench.server_process import BenchServer


class ServerProcess(BenchServer):
    """The benchmarks' launcher on the CPU, with its log in a temporary file that failures quote whole."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None, startup_timeout: float = 120.0,
                 tls: ssl.SSLContext | None = None) -> None:
        with tempfile.NamedTemporaryFile(prefix="gptserve-", suffix=".log", delete=False) as log:
            log_path = Path(log.name)
        super().__init__(["--device", "cpu", *args], log_path, startup_timeout, env, tls=tls)

    @property
    def v1(self) -> str:
        return self.base_url + "/v1"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def failure_detail(self) -> str:
        return "\n" + self.log_text()

    def health(self) -> dict:
        return httpx.get(self.base_url + "/health", timeout=10.0, verify=self.verify).json()


def exits_within(pid: int, seconds: float) -> bool:
    """Whether process ``pid`` (a server's child: a rank, an engine core) is gone or a zombie within ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(")")[-1].split()[0] == "Z":  # exited, not yet reaped
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.1)
    return False
