"""The server's front end never loads torch, even after serving: only the engine core computes, and torch with
its OpenMP runtime would add its libraries and their heap to every server's resident memory."""

from __future__ import annotations

from pathlib import Path

import httpx

from tests.server_process import ServerProcess
from tests.test_engine_core_process import core_pid


def test_the_front_end_process_never_maps_torch_while_its_core_does(tiny_gpt2_dir: Path) -> None:
    server = ServerProcess(["--model", f"tiny={tiny_gpt2_dir}"])
    with server:
        completion = httpx.post(server.v1 + "/completions", timeout=60,
                                json={"model": "tiny", "prompt": "Hello", "max_tokens": 4, "logprobs": 2})
        chat = httpx.post(server.v1 + "/chat/completions", timeout=60,
                          json={"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
        front_end = Path(f"/proc/{server.pid}/maps").read_text()
        core = Path(f"/proc/{core_pid(server)}/maps").read_text()
    assert completion.status_code == 200 and chat.status_code == 200, (completion.text, chat.text)
    assert "libtorch" in core
    assert "libtorch" not in front_end
