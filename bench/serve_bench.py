"""``python -m bench.serve_bench``: the performance issue's serving benchmark in one command.

Makes the random GPT-2-124M checkpoint if absent, starts gptserve on it (or measures ``--base-url``), and
runs four loadgen scenarios, each with its own prompt seed so that no scenario hits another's prefix cache:

- throughput: closed loop at C = 1, 4, 16, 64 with P=128, G=128;
- idle TTFT: lone P=128 requests (C=1, G=16), the reference for TTFT p99 at C=16;
- steady C=16 TTFT: the closed loop at C=16 again (P=128, G=128, 3 requests per client) with the clients'
  first requests spread over one request's lifetime (the throughput level's median e2e), as independent
  clients arrive. The throughput level's C=16 starts all 16 at once, and that burst's last prompt waits for
  all 16 prefills whatever the scheduler does: its TTFT p99 is reported too, but the target is the steady one;
- prefix cold / warm: 1000-token prompts (G=16, C=1), all distinct, then all identical (the warm-up fills
  the cache), for the repeated-prompt TTFT ratio.

Writes PREFIX.json (every report, the summary, the commit and server command) and PREFIX.txt (tables).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from bench.loadgen import BenchConfig, format_table, run_benchmark
from bench.make_gpt2_checkpoint import write_gpt2_checkpoint
from bench.server_process import PROJECT_ROOT, BenchServer

MODEL_NAME = "gpt2-124m"
# The performance issue's targets: (summary key, comparison, bound).
TARGETS = {
    "c1_output_tok_s": (">=", 44.0),
    "c64_output_tok_s": (">=", 230.0),
    "ttft_c16_steady_p99_over_idle_p50": ("<=", 2.0),
    "prefix_cold_over_warm_ttft_p50": (">=", 5.0),
}


def scenarios(args: argparse.Namespace, base_url: str) -> dict[str, BenchConfig]:
    base = BenchConfig(base_url=base_url, timeout=args.timeout)
    prefix = replace(base, prompt_len=args.prefix_len, output_len=16, concurrency=[1],
                     num_requests=args.prefix_requests)
    return {
        "throughput": replace(base, prompt_len=args.prompt_len, output_len=args.output_len,
                              concurrency=args.concurrency, num_requests=args.num_requests, seed=0),
        "ttft_idle": replace(base, prompt_len=args.prompt_len, output_len=16, concurrency=[1], num_requests=8, seed=1),
        "ttft_c16_steady": replace(base, prompt_len=args.prompt_len, output_len=args.output_len, concurrency=[16],
                                   num_requests=48, seed=4, ramp_up=args.ttft_ramp_up or 0.0),
        "prefix_cold": replace(prefix, seed=2),
        "prefix_warm": replace(prefix, seed=3, shared_prefix_len=args.prefix_len),
    }


def level_at(report: dict, concurrency: int) -> dict | None:
    return next((lv for lv in report["levels"] if lv["concurrency"] == concurrency), None)


def ratio(num: float | None, den: float | None) -> float | None:
    return None if num is None or not den else num / den


def summarize(reports: dict[str, dict]) -> dict[str, float | None]:
    throughput = reports["throughput"]
    summary: dict[str, float | None] = {}
    for level in throughput["levels"]:
        summary[f"c{level['concurrency']}_output_tok_s"] = level["output_throughput"]
    c16 = level_at(throughput, 16)
    idle = reports["ttft_idle"]["levels"][0]["ttft_ms"]["p50"]
    cold = reports["prefix_cold"]["levels"][0]["ttft_ms"]["p50"]
    warm = reports["prefix_warm"]["levels"][0]["ttft_ms"]["p50"]
    summary |= {
        "ttft_idle_p50_ms": idle,
        "ttft_c16_p99_ms": c16["ttft_ms"]["p99"] if c16 else None,
        "prefix_cold_ttft_p50_ms": cold,
        "prefix_warm_ttft_p50_ms": warm,
    }
    steady = reports["ttft_c16_steady"]["levels"][0]["ttft_ms"]["p99"]
    summary["ttft_c16_steady_p99_ms"] = steady
    summary["ttft_c16_p99_over_idle_p50"] = ratio(summary["ttft_c16_p99_ms"], idle)
    summary["ttft_c16_steady_p99_over_idle_p50"] = ratio(steady, idle)
    summary["prefix_cold_over_warm_ttft_p50"] = ratio(cold, warm)
    return summary


def target_lines(summary: dict[str, float | None]) -> list[str]:
    lines = []
    for key, (op, bound) in TARGETS.items():
        value = summary.get(key)
        if value is None:
            lines.append(f"{key}: not measured (target {op} {bound:g})")
            continue
        met = value >= bound if op == ">=" else value <= bound
        lines.append(f"{key}: {value:.2f} (target {op} {bound:g}: {'met' if met else 'MISSED'})")
    return lines


def git_state() -> dict[str, str | bool]:
    def git(*cmd: str) -> str:
        return subprocess.run(["git", *cmd], cwd=PROJECT_ROOT, capture_output=True, text=True).stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--", "server", "models"))}


def run_all(configs: dict[str, BenchConfig]) -> dict[str, dict]:
    reports = {}
    for name, config in configs.items():
        c16 = level_at(reports["throughput"], 16) if "throughput" in reports else None
        if name == "ttft_c16_steady" and not config.ramp_up and c16 and c16["e2e_ms"]["p50"]:
            config = replace(config, ramp_up=c16["e2e_ms"]["p50"] / 1000)
        print(f"== {name}", file=sys.stderr, flush=True)
        reports[name] = asyncio.run(run_benchmark(config))
        print(format_table(reports[name]), file=sys.stderr, flush=True)
    return reports


def write_results(prefix: Path, meta: dict, reports: dict[str, dict]) -> str:
    summary = summarize(reports)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    prefix.with_suffix(".json").write_text(json.dumps({**meta, "summary": summary, "reports": reports}, indent=2))
    parts = [f"{k}: {v}" for k, v in meta.items()]
    for name, report in reports.items():
        config = report["config"]
        parts += ["", f"## {name}: P={config['prompt_len']} G={config['output_len']} "
                  f"shared_prefix={config['shared_prefix_len']}", format_table(report)]
    parts += ["", "## targets", *target_lines(summary)]
    text = "\n".join(parts) + "\n"
    prefix.with_suffix(".txt").write_text(text)
    return text


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.serve_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, default=Path(".cache/bench/gpt2-124m"),
                   help="GPT-2 checkpoint to serve; the random 124M one is written here if absent")
    p.add_argument("--out", type=Path, help="results prefix (default: .cache/bench/results/serve-TIMESTAMP)")
    p.add_argument("--server-args", default="", help="extra gptserve flags, e.g. '--max-num-seqs 64'")
    p.add_argument("--base-url", help="measure this running server instead of starting gptserve")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--num-requests", type=int, help="per throughput level (default: loadgen's max(2C, 16))")
    p.add_argument("--prefix-len", type=int, default=1000, help="prompt tokens of the prefix-cache scenarios")
    p.add_argument("--prefix-requests", type=int, default=4)
    p.add_argument("--ttft-ramp-up", type=float,
                   help="seconds over which the steady C=16 clients start (default: the C=16 level's median e2e)")
    p.add_argument("--timeout", type=float, default=600.0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = args.out or Path(".cache/bench/results") / time.strftime("serve-%Y%m%d-%H%M%S")
    meta: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "cpus": os.cpu_count(), **git_state()}
    if args.base_url:
        meta["server"] = args.base_url
        reports = run_all(scenarios(args, args.base_url))
    else:
        if not (args.checkpoint / "config.json").is_file():
            print(f"writing the random GPT-2-124M checkpoint to {args.checkpoint}", file=sys.stderr)
            write_gpt2_checkpoint(args.checkpoint)
        out.parent.mkdir(parents=True, exist_ok=True)
        server_args = ["--model", f"{MODEL_NAME}={args.checkpoint.resolve()}", *shlex.split(args.server_args)]
        with BenchServer(server_args, out.with_suffix(".server.log")) as server:
            meta["server"] = shlex.join(["gptserve", *server_args])
            reports = run_all(scenarios(args, server.base_url))
    print(write_results(out, meta, reports))
    print(f"results: {out.with_suffix('.json')} and {out.with_suffix('.txt')}", file=sys.stderr)
    failed = any(level["failed"] for report in reports.values() for level in report["levels"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
