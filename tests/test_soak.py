"""Soak: 30 s of warm-up and 40 s more of 64 clients with the whole request mix and dropped streams; nothing
lost, RSS level over the 40 s (see bench/soak.py)."""

from __future__ import annotations

import asyncio

import pytest

from bench.soak import run_soak
from tests.server_process import ServerProcess


@pytest.fixture(scope="module")
def server(tiny_gpt2_dir):
    args = ["--model", f"soak={tiny_gpt2_dir}", "--max-num-seqs", "16", "--max-queue", "32",
            "--kv-cache-tokens", "1024"]
    with ServerProcess(args) as running:
        yield running


def test_seventy_seconds_of_mixed_load_lose_nothing_and_rss_levels_off(server):
    report = asyncio.run(run_soak(server.base_url, "soak", duration=40, clients=64, pid=server._process.pid,
                                  warmup=30))
    assert report.ok, (report.failures, report.tally.mismatches[:3], report.tally.errors[:3])
    assert report.tally.completed > 64 and report.tally.disconnected > 0
    assert report.rss_growth is not None and report.rss_growth < 0.05
