"""What the side-by-side benchmarks against llama.cpp share: its server as a context manager, one measurement
(closed-loop output tok/s, TTFT and TPOT medians, peak RSS of the server's process tree) and the table."""

from __future__ import annotations

import argparse
import asyncio
import threading
from dataclasses import replace
from pathlib import Path

from bench import llama_cpp
from bench.loadgen import BenchConfig, run_benchmark
from bench.server_process import BenchServer


def tree_rss_kib(root_pid: int) -> int:
    """Resident memory of ``root_pid`` and every descendant (an engine core, tensor-parallel ranks)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":", 1) for line in stat.read_text().splitlines() if ":" in line)
        except OSError:
            continue
        pid = int(fields["Pid"])
        children.setdefault(int(fields["PPid"]), []).append(pid)
        rss[pid] = int(fields.get("VmRSS", "0 kB").split()[0])
    total, stack = 0, [root_pid]
    while stack:
        pid = stack.pop()
        total += rss.get(pid, 0)
        stack += children.get(pid, [])
    return total


class PeakTreeRss:
    def __init__(self, pid: int) -> None:
        self.pid, self.peak_kib = pid, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self.peak_kib = max(self.peak_kib, tree_rss_kib(self.pid))

    def __enter__(self) -> PeakTreeRss:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()


class LlamaServer(BenchServer):
    """llama.cpp's server, started, waited for (its /health is 200 once loaded) and stopped as gptserve is."""

    def __init__(self, gguf: Path, threads: int, log_path: Path, parallel: int, context: int) -> None:
        super().__init__([], log_path, startup_timeout=600)
        self.cmd = [str(llama_cpp.server_binary()), "-m", str(gguf), "--host", "127.0.0.1", "--port",
                    str(self.port), "-t", str(threads), "-np", str(parallel), "-c", str(context)]


def measure(server: BenchServer, args: argparse.Namespace, vocab_size: int) -> dict:
    """One closed-loop run per level in ``args.concurrency`` (``args.requests`` each, P and G from ``args``),
    with the peak resident memory of the server's process tree over the whole run."""
    config = BenchConfig(base_url=server.base_url, prompt_len=args.prompt_len, output_len=args.output_len,
                         concurrency=args.concurrency, vocab_size=vocab_size, timeout=1800.0)
    with PeakTreeRss(server.pid) as peak:
        report = asyncio.run(run_benchmark(replace(config, num_requests=args.requests)))
    row = {"peak_rss_gib": peak.peak_kib / 2**20}
    for level in report["levels"]:
        c = level["concurrency"]
        row |= {f"c{c}_tok_s": level["output_throughput"], f"c{c}_ttft_ms": level["ttft_ms"]["p50"],
                f"c{c}_tpot_ms": level["tpot_ms"]["p50"], f"c{c}_failed": level["failed"]}
    return row


def table(rows: list[tuple[str, dict]], concurrency: list[int]) -> str:
    head = ["run"] + [f"C={c} {k}" for c in concurrency for k in ("tok/s", "TTFT ms", "TPOT ms")] + ["peak GiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in rows:
        cells = [name] + [f"{row[f'c{c}_{k}']:.1f}" for c in concurrency for k in ("tok_s", "ttft_ms", "tpot_ms")]
        lines.append("| " + " | ".join(cells + [f"{row['peak_rss_gib']:.2f}"]) + " |")
    return "\n".join(lines)
