"""What a new user does first, checked: the README's set-up line in a clean venv, then ``gptserve`` with no flags.

Runtime dependencies only (no test extra), the hub offline and its cache empty, a cache dir of its own: the server
must write and serve the demo checkpoint, answer one completion, stop cleanly, and log no traceback or warning.
Standard library only, so any python3 with venv runs it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT_S = 300  # the first start compiles the C++ kernels: ~15 s alone, minutes on a busy 2-core machine
BAD_LOG_LINE = re.compile(r"traceback|warn", re.IGNORECASE)


def main() -> int:
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="gptserve-fresh-") as tmp:
        work = Path(tmp)
        gptserve = install(work / "venv")
        print(f"fresh install: installed in {time.monotonic() - started:.0f} s", flush=True)
        log = serve_one_completion(gptserve, work)
        bad = [line for line in log.splitlines() if BAD_LOG_LINE.search(line)]
        if bad:
            sys.exit("fresh install: the log has a traceback or a warning:\n" + "\n".join(bad))
    print(f"fresh install: ok in {time.monotonic() - started:.0f} s", flush=True)
    return 0


def install(venv: Path) -> Path:
    """README: ``pip install torch==2.13.0 && pip install -e .``, pinned as CI pins everything."""
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "torch==2.13.0"], check=True)
    subprocess.run([*pip, "-c", str(PROJECT_ROOT / ".ci" / "constraints.txt"), "-e", str(PROJECT_ROOT)], check=True)
    return venv / "bin" / "gptserve"


def serve_one_completion(gptserve: Path, work: Path) -> str:
    """Start, wait for /ready, complete once, SIGTERM; returns the whole log."""
    port = free_port()
    env = {name: value for name, value in os.environ.items()
           if not name.startswith(("GPTSERVE_", "HF_", "PYTHON", "VIRTUAL_ENV"))}
    env |= {"HF_HUB_OFFLINE": "1", "HF_HOME": str(work / "hf"), "XDG_CACHE_HOME": str(work / "cache"),
            "GPTSERVE_PORT": str(port)}
    log_path = work / "gptserve.log"
    with log_path.open("wb") as log:
        server = subprocess.Popen([str(gptserve)], cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(server, base, log_path)
        [model] = [m["id"] for m in get_json(base + "/v1/models")["data"]]
        body = {"model": model, "prompt": "Hello, my name is", "max_tokens": 8}
        completion = get_json(base + "/v1/completions", body)
        if completion["usage"]["completion_tokens"] != 8 or not isinstance(completion["choices"][0]["text"], str):
            fail(f"unexpected completion {completion}", log_path)
        print(f"fresh install: {model} answered {completion['choices'][0]['text']!r}", flush=True)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            code = server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            code = server.wait()
    if code != 0:
        fail(f"gptserve exited with {code} after SIGTERM", log_path)
    return log_path.read_text(errors="replace")


def wait_ready(server: subprocess.Popen, base: str, log_path: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            fail(f"gptserve exited with {server.returncode} before /ready", log_path)
        try:
            get_json(base + "/ready")
            return
        except (OSError, urllib.error.URLError):
            time.sleep(0.5)
    fail(f"gptserve not ready after {READY_TIMEOUT_S} s", log_path)


def get_json(url: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.load(response)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fail(message: str, log_path: Path) -> None:
    sys.exit(f"fresh install: {message}\n--- gptserve log ---\n{log_path.read_text(errors='replace')}")


if __name__ == "__main__":
    sys.exit(main())
