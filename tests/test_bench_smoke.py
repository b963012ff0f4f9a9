"""CI smoke run of the benchmark path: ``python -m bench.loadgen`` against a real gptserve on the tiny GPT-2.

Checks that the load generator and the server agree on the streaming contract it relies on (usage chunk,
exactly G tokens with ignore_eos/min_tokens, finish reasons); timings are reported, never asserted.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.server_process import PROJECT_ROOT
from tests.server_process import ServerProcess

PROMPT_LEN, OUTPUT_LEN, REQUESTS = 16, 8, 6


@pytest.fixture(scope="module")
def server(tiny_gpt2_dir: Path) -> Iterator[ServerProcess]:
    with ServerProcess(["--model", f"tiny={tiny_gpt2_dir}"]) as running:
        yield running


def run_loadgen(server: ServerProcess, json_out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "bench.loadgen", "--base-url", server.base_url, "--prompt-len", str(PROMPT_LEN),
           "--output-len", str(OUTPUT_LEN), "--num-requests", str(REQUESTS), "--timeout", "60",
           "--json-out", str(json_out), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=PROJECT_ROOT)


def test_loadgen_closed_loop_against_gptserve_gets_exactly_g_tokens_per_request(
    server: ServerProcess, tmp_path: Path
) -> None:
    out = tmp_path / "report.json"
    proc = run_loadgen(server, out, "--concurrency", "1", "4")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "out tok/s" in proc.stdout and "C=1" in proc.stdout and "C=4" in proc.stdout
    report = json.loads(out.read_text())
    assert report["model"] == "tiny"
    assert [level["concurrency"] for level in report["levels"]] == [1, 4]
    for level in report["levels"]:
        assert level["completed"] == REQUESTS and level["failed"] == 0 and level["errors"] == {}
        assert level["output_len_mismatch"] == 0
        assert level["total_output_tokens"] == REQUESTS * OUTPUT_LEN
        assert level["total_input_tokens"] == REQUESTS * PROMPT_LEN
        for name in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
            assert level[name]["p50"] is not None and level[name]["p50"] > 0, name
        assert level["ttft_ms"]["p50"] <= level["e2e_ms"]["p50"]


def test_loadgen_shared_prefix_requests_all_complete(server: ServerProcess, tmp_path: Path) -> None:
    out = tmp_path / "prefix.json"
    proc = run_loadgen(server, out, "--concurrency", "2", "--shared-prefix-len", str(PROMPT_LEN))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (level,) = json.loads(out.read_text())["levels"]
    assert level["completed"] == REQUESTS and level["output_len_mismatch"] == 0
    assert level["total_output_tokens"] == REQUESTS * OUTPUT_LEN


def test_loadgen_exits_2_when_the_server_serves_no_such_model(server: ServerProcess, tmp_path: Path) -> None:
    proc = run_loadgen(server, tmp_path / "unused.json", "--concurrency", "1", "--model", "no-such-model")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "warm-up request failed" in proc.stderr
    assert not (tmp_path / "unused.json").exists()
