"""``python -m bench.core_before_after --before DIR``: served output tok/s of this checkout against another one
(e.g. the commit before the engine core moved to its own process), and each server's start-up time.

Starts one server from each checkout on the random GPT-2-124M checkpoint (written if absent), then alternates
closed-loop runs (P=128, G=128) at each concurrency between them, round after round, so that load from
elsewhere on the machine falls on both alike. Each run has its own prompt seed (no prefix-cache hits across
runs). Prints one line per run and the mean per level.

    git worktree add ../core-before c4d3b9c
    python -m bench.core_before_after --before ../core-before --concurrency 1 64 --rounds 2

``--startups N`` instead times N server starts of each checkout, alternated (what every test server costs):
spawn to the first /health 200, then SIGTERM; and from the log, how long the front end took from its core's
Ready to serving (the app's start-up, and in older checkouts the tokenizer's load).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from datetime import datetime
from pathlib import Path

from bench.loadgen import BenchConfig, run_benchmark
from bench.make_gpt2_checkpoint import write_gpt2_checkpoint
from bench.server_process import PROJECT_ROOT, BenchServer


def start(root: Path, checkpoint: Path, log: Path) -> tuple[BenchServer, float]:
    # torch names a kernel build by its sources' paths too: two checkouts sharing one folder rebuild in turn
    env = {"TORCH_EXTENSIONS_DIR": str(root / ".cache" / "torch_extensions")}
    server = BenchServer(["--device", "cpu", "--dtype", "float32", "--model", f"gpt2={checkpoint}"], log, env=env,
                         cwd=root)
    started = time.monotonic()
    server.__enter__()
    return server, time.monotonic() - started


def time_startups(before: Path, checkpoint: Path, count: int) -> None:
    seconds: dict[str, list[float]] = {"before": [], "after": []}
    for _ in range(count):
        for name, root in (("before", before), ("after", PROJECT_ROOT)):
            server, took = start(root, checkpoint, Path(tempfile.gettempdir()) / f"core_before_after.{name}.log")
            server.__exit__(None, None, None)
            seconds[name].append(took)
            text = server.log_path.read_text()
            after_ready = _stamp(text, "Application startup complete.") - _stamp(text, "engine core ready")
            print(f"{name}: start-up {took:.2f} s, core Ready -> serving {after_ready:.2f} s", flush=True)
    for name, values in seconds.items():
        print(f"{name}: median start-up {sorted(values)[len(values) // 2]:.2f} s over {[round(v, 2) for v in values]}")


def _stamp(log: str, message: str) -> float:
    """When the JSON log line ``message`` was written (the first one: a start-up has one core)."""
    for line in log.splitlines():
        if line.startswith("{") and json.loads(line).get("msg") == message:
            return datetime.fromisoformat(json.loads(line)["ts"].rstrip("Z")).timestamp()
    raise ValueError(f"no log line {message!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, required=True, help="root of the checkout to compare against")
    parser.add_argument("--checkpoint", type=Path, default=Path(".cache/bench/gpt2-124m"))
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--startups", type=int, default=0, help="only time this many starts of each server")
    args = parser.parse_args()
    checkpoint = args.checkpoint.resolve()
    if not (checkpoint / "config.json").is_file():
        write_gpt2_checkpoint(checkpoint)
    if args.startups:
        time_startups(args.before.resolve(), checkpoint, args.startups)
        return
    servers: dict[str, BenchServer] = {}
    try:
        for name, root in (("before", args.before.resolve()), ("after", PROJECT_ROOT)):
            log = Path(tempfile.gettempdir()) / f"core_before_after.{name}.log"
            servers[name], seconds = start(root, checkpoint, log)
            print(f"{name}: {root}, start-up (spawn to /health 200) {seconds:.1f} s", flush=True)
        results: dict[tuple[str, int], list[float]] = {}
        seed = 100
        for round_index in range(args.rounds):
            for concurrency in args.concurrency:
                for name, server in servers.items():
                    seed += 1
                    config = BenchConfig(base_url=server.base_url, prompt_len=128, output_len=128,
                                         concurrency=[concurrency],
                                         num_requests=concurrency * args.requests_per_client, seed=seed)
                    level = asyncio.run(run_benchmark(config))["levels"][0]
                    results.setdefault((name, concurrency), []).append(level["output_throughput"])
                    print(f"round {round_index + 1} C={concurrency} {name}: {level['output_throughput']:.1f} out tok/s",
                          flush=True)
    finally:
        for server in servers.values():
            server.__exit__(None, None, None)
    for (name, concurrency), values in sorted(results.items(), key=lambda item: (item[0][1], item[0][0])):
        print(f"C={concurrency} {name}: mean {sum(values) / len(values):.1f} out tok/s over {values}")


if __name__ == "__main__":
    main()
