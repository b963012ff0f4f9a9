"""``python -m bench.rss_breakdown --model DIR [server flags]``: where a served model's resident memory goes.

Starts gptserve, samples every process of its tree (front end, engine core, ...) five times a second, and
prints, per phase (start-up until /ready, one request of P prompt tokens and G output tokens, C such requests
at once, idle), each process's peak RSS split into anonymous, file-backed (mmapped checkpoint pages, shared
libraries) and shared memory, and the whole tree's peak, which is what bench.side_by_side reports.
"""

from __future__ import annotations

import argparse
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from bench.server_process import BenchServer

FIELDS = ("VmRSS", "RssAnon", "RssFile", "RssShmem")


def descendants(root_pid: int) -> dict[int, dict[str, int]]:
    """``FIELDS`` in KiB for every descendant of ``root_pid`` (this process: the server's, from its start)."""
    status: dict[int, dict[str, str]] = {}
    for path in Path("/proc").glob("[0-9]*/status"):
        try:
            status[int(path.parent.name)] = dict(
                line.split(":", 1) for line in path.read_text().splitlines() if ":" in line)
        except (OSError, ValueError):
            continue
    tree: dict[int, dict[str, int]] = {}
    stack = [root_pid]
    while stack:
        parent = stack.pop()
        for pid, fields in status.items():
            if int(fields["PPid"]) == parent:
                tree[pid] = {key: int(fields.get(key, "0 kB").split()[0]) for key in FIELDS}
                stack.append(pid)
    return tree


class Sampler:
    """Peaks of every process's fields and of the tree's VmRSS sum, per phase."""

    def __init__(self) -> None:
        self.root_pid = os.getpid()
        self.phase = "start-up"
        self.peaks: dict[str, dict[int, dict[str, int]]] = {}
        self.tree_peaks: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            tree, phase = descendants(self.root_pid), self.phase
            per_process = self.peaks.setdefault(phase, {})
            for pid, fields in tree.items():
                peak = per_process.setdefault(pid, dict.fromkeys(FIELDS, 0))
                for key in FIELDS:
                    peak[key] = max(peak[key], fields[key])
            self.tree_peaks[phase] = max(self.tree_peaks.get(phase, 0), sum(f["VmRSS"] for f in tree.values()))

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def report(self) -> str:
        lines = ["| phase | process | peak RSS MiB | anon | file | shmem |", "|---|---|---|---|---|---|"]
        for phase, per_process in self.peaks.items():
            for pid, peak in per_process.items():
                role = f"process {pid}"
                cells = [f"{peak[key] / 1024:.0f}" for key in FIELDS]
                lines.append(f"| {phase} | {role} | " + " | ".join(cells) + " |")
            lines.append(f"| {phase} | tree (sum, peak) | {self.tree_peaks[phase] / 1024:.0f} | | | |")
        return "\n".join(lines)


def complete(base_url: str, model: str, prompt: list[int], output_len: int) -> None:
    body = {"model": model, "prompt": prompt, "max_tokens": output_len, "min_tokens": output_len,
            "temperature": 0.0, "ignore_eos": True}
    response = httpx.post(base_url + "/v1/completions", json=body, timeout=1800.0)
    response.raise_for_status()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.rss_breakdown", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=199998, help="prompt ids are drawn below this")
    parser.add_argument("--idle-s", type=float, default=3.0)
    parser.add_argument("--log", type=Path, default=Path("/tmp/rss_breakdown.log"))
    args, server_args = parser.parse_known_args(argv)
    rng = random.Random(0)
    prompts = [[rng.randrange(args.vocab) for _ in range(args.prompt_len)] for _ in range(args.concurrency + 1)]
    with Sampler() as sampler, BenchServer(["--model", f"m={args.model}", *server_args], args.log, 900) as server:
        while httpx.get(server.base_url + "/ready", timeout=5.0).status_code != 200:
            time.sleep(0.2)
        sampler.phase = "one request"
        complete(server.base_url, "m", prompts[0], args.output_len)
        sampler.phase = f"{args.concurrency} at once"
        with ThreadPoolExecutor(args.concurrency) as pool:
            list(pool.map(lambda p: complete(server.base_url, "m", p, args.output_len), prompts[1:]))
        sampler.phase = "idle"
        time.sleep(args.idle_s)
    print(sampler.report())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
