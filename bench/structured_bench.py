"""``python -m bench.structured_bench``: throughput at C=16 with every request constrained vs none.

Starts gptserve on the random GPT-2-124M checkpoint (written if absent), then alternates closed-loop runs of
plain and constrained completions, so that load from elsewhere on the machine falls on both alike. The
constraint is a JSON schema of at least 40 short strings: it cannot finish before G=64 tokens, so both kinds
run every request to max_tokens and the same work is compared, and it spends most tokens inside strings,
where nearly the whole vocabulary is allowed (the dearest masks). Prints one table per run and the ratio of
the output throughputs.
"""

from __future__ import annotations

import argparse
import asyncio
from dataclasses import replace
from pathlib import Path

from bench.loadgen import BenchConfig, format_table, run_benchmark
from bench.make_gpt2_checkpoint import write_gpt2_checkpoint
from bench.server_process import BenchServer

SCHEMA = {"type": "array", "items": {"type": "string", "maxLength": 8}, "minItems": 40}
CONSTRAINED = {"response_format": {"type": "json_schema", "json_schema": {"name": "words", "schema": SCHEMA}},
               "ignore_eos": False, "min_tokens": 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=Path(".cache/bench/gpt2-124m"))
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2, help="pairs of runs, plain then constrained")
    parser.add_argument("--log", type=Path, default=Path("structured_bench.server.log"))
    args = parser.parse_args()
    if not (args.checkpoint / "config.json").is_file():
        write_gpt2_checkpoint(args.checkpoint)
    with BenchServer(["--device", "cpu", "--model", f"gpt2={args.checkpoint.resolve()}"], args.log) as server:
        base = BenchConfig(base_url=server.base_url, prompt_len=128, output_len=args.output_len,
                           concurrency=[args.concurrency], num_requests=args.num_requests)
        throughput: dict[str, list[float]] = {"plain": [], "constrained": []}
        for round_index in range(args.rounds):
            for kind_index, (kind, extra) in enumerate((("plain", {}), ("constrained", CONSTRAINED))):
                seed = 10 + 2 * round_index + kind_index  # distinct prompts: no run hits another's prefix cache
                report = asyncio.run(run_benchmark(replace(base, seed=seed, extra_body=extra)))
                print(f"-- {kind}, round {round_index + 1}\n{format_table(report)}", flush=True)
                throughput[kind].append(report["levels"][0]["output_throughput"])
    plain, constrained = (sum(v) / len(v) for v in throughput.values())
    print(f"output tok/s at C={args.concurrency}: plain {plain:.1f}, constrained {constrained:.1f}, "
          f"ratio {constrained / plain:.2f}")


if __name__ == "__main__":
    main()
