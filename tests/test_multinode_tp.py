"""Tensor parallel over two "nodes" under torchrun: ``--nnodes 2 --nproc-per-node 1``, one launcher per
``--node-rank``, both on 127.0.0.1 over gloo, the same command line on each as docs/distributed.md gives it.
Node 0's rank serves HTTP with the same greedy tokens and logprobs as one process; SIGTERM to node 0's
launcher stops both nodes; node 1's rank hanging inside a step (not dying) turns the server 503, then stops it."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from bench.server_process import PROJECT_ROOT, free_port
from models.testing.gpt_oss_checkpoint import write_tiny_gpt_oss
from tests.server_process import ServerProcess
from tests.test_tensor_parallel_api import check_against_one_process, random_prompts

NODE_EXIT_S = 30  # node 1's launcher waits at torchrun's exit barrier until node 0's has gone
STARTUP_S = 300.0  # two launchers, two ranks loading, on a shared machine


def node_command(node_rank: int, master_port: int, server_args: list[str]) -> list[str]:
    """What a user runs on node ``node_rank``: torchrun (as ``python -m torch.distributed.run``) + the server."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
            "--node-rank", str(node_rank), "--master-addr", "127.0.0.1", "--master-port", str(master_port),
            "-m", "server", *server_args]


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``, read from /proc (children first reached, then theirs)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])  # after the command name: state, ppid
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    found, stack = [], [pid]
    while stack:
        below = children.get(stack.pop(), [])
        found += below
        stack += below
    return found


class TwoNodes(ServerProcess):
    """Node 0's launcher is the server under test (its rank 0 serves HTTP); node 1's runs beside it."""

    def __init__(self, model_dir: Path, extra_args: tuple[str, ...] = (), env: dict[str, str] | None = None) -> None:
        super().__init__(["--model", f"tiny={model_dir}", "--tensor-parallel-size", "2", "--dtype", "float32",
                          "--kv-cache-tokens", "4096", "--block-size", "8", *extra_args], env=env,
                         startup_timeout=STARTUP_S)
        master_port = free_port()
        server_args = self.cmd[3:]  # everything after ``python -m server``: the same on both nodes
        self.cmd = node_command(0, master_port, server_args)
        self.node1_cmd = node_command(1, master_port, server_args)
        self.node1: subprocess.Popen | None = None

    def __enter__(self) -> TwoNodes:
        with self.log_path.with_suffix(".node1.log").open("wb") as log:
            self.node1 = subprocess.Popen(self.node1_cmd, cwd=PROJECT_ROOT, env=self.env, stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True)
        try:
            super().__enter__()
        except BaseException:
            self.kill_node1()
            raise
        return self

    def kill_node1(self) -> None:
        """torchrun starts its worker in a session of its own: killing the launcher's group would leave a rank
        hung in a step running forever, so every descendant is killed by pid."""
        if self.node1 is not None:
            for pid in [self.node1.pid, *descendants(self.node1.pid)]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self.node1.wait()

    def node1_log(self) -> str:
        return self.log_path.with_suffix(".node1.log").read_text(errors="replace")

    def failure_detail(self) -> str:
        return f"\nnode 0:\n{self.log_text()}\nnode 1:\n{self.node1_log()}"


def test_two_nodes_one_rank_each_serve_gpt_oss_like_one_process_and_sigterm_stops_both(tmp_path):
    model_dir = write_tiny_gpt_oss(tmp_path / "gpt-oss", sliding_window=4)
    nodes = TwoNodes(model_dir)
    with nodes:
        check_against_one_process(nodes, model_dir, random_prompts(199_998, seed=4))
    # leaving the block sent SIGTERM to node 0's launcher and waited for it
    assert nodes.node1 is not None
    try:
        nodes.node1.wait(timeout=NODE_EXIT_S)
    except subprocess.TimeoutExpired:
        nodes.kill_node1()
        pytest.fail(f"node 1 still running {NODE_EXIT_S} s after node 0 stopped:{nodes.failure_detail()}")
    assert "tensor-parallel rank 1 stopped" in nodes.node1_log(), nodes.failure_detail()


def test_a_hung_rank_on_the_other_node_hits_the_step_timeout_then_503s_and_node_0_exits_non_zero(tmp_path):
    """The fault hook puts node 1's rank to sleep inside the step that holds ``hang_token``: rank 0's collectives
    give up after --tp-step-timeout, /health and later requests answer 503, and node 0's server (so its
    launcher) exits non-zero, for a restart."""
    hang_token, step_timeout = 999, 2.0
    model_dir = write_tiny_gpt_oss(tmp_path / "gpt-oss", sliding_window=4)
    nodes = TwoNodes(model_dir, ("--tp-step-timeout", str(step_timeout)),
                     env={"GPTSERVE_FAULT_HANG_TOKEN_ID": str(hang_token)})
    try:
        with nodes, httpx.Client(base_url=nodes.v1, timeout=60) as http:
            request = {"model": "tiny", "max_tokens": 2, "temperature": 0}
            assert http.post("/completions", json=request | {"prompt": [1, 2, 3]}).status_code == 200
            started = time.monotonic()
            hung = http.post("/completions", json=request | {"prompt": [1, 2, hang_token]})
            seconds = time.monotonic() - started
            after = http.post("/completions", json=request | {"prompt": [1, 2, 3]})
            health = httpx.get(nodes.base_url + "/health", timeout=10)
            status = nodes._process.wait(timeout=NODE_EXIT_S)
    finally:
        nodes.kill_node1()  # its rank sleeps inside the step: it never leaves by itself
    assert hung.status_code == 503, f"{hung.text}{nodes.failure_detail()}"
    assert step_timeout <= seconds < step_timeout + 20
    assert after.status_code == 503 and health.status_code == 503
    assert status != 0
