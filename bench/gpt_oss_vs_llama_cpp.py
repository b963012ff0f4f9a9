"""``python -m bench.gpt_oss_vs_llama_cpp``: GPT-OSS served by gptserve and by llama.cpp, side by side, one table.

Writes (once, cached) a random checkpoint of the gpt-oss-20b widths with fewer layers (hidden 2880, 64/8 heads,
32 experts top-4, MXFP4 experts, sinks, sliding window; 6 layers by default) in the HF layout openai ships, with
the tokenizer made by transformers' converter; converts it with llama.cpp's own ``convert_hf_to_gguf.py``;
builds llama.cpp's server from the pinned source (bench/llama_cpp.py); then serves each in turn, alternated for
``--rounds`` rounds, one server at a time, and measures the same closed-loop load (P=512, G=64, C=1 and 4):
output tok/s, TTFT and TPOT medians, and the peak resident memory of the server's whole process tree. Never
run in CI (the checkpoint is ~4 GB and the build ~10 minutes).
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import threading
from dataclasses import replace
from pathlib import Path

from bench import llama_cpp
from bench.gpt_oss_20b_memory import CONFIG_20B, write_checkpoint
from bench.loadgen import BenchConfig, run_benchmark
from bench.server_process import BenchServer

# The KV pool matches llama.cpp's (-np 4 -c 4096 below), so neither server's peak memory counts a bigger cache.
GPTSERVE_ARGS = ("--keep-experts-packed --cpu-weight-dtype bfloat16 --kv-cache-dtype bfloat16 "
                 "--max-num-batched-tokens 2048 --max-num-seqs 4 --kv-cache-tokens 4096")
O200K_TEXT_IDS = 199998  # prompts draw ids below the harmony specials


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

    def __init__(self, gguf: Path, threads: int, log_path: Path) -> None:
        super().__init__([], log_path, startup_timeout=600)
        self.cmd = [str(llama_cpp.server_binary()), "-m", str(gguf), "--host", "127.0.0.1", "--port",
                    str(self.port), "-t", str(threads), "-np", "4", "-c", str(4 * 1024)]


def measure(server, pid: int, args: argparse.Namespace) -> dict:
    config = BenchConfig(base_url=server.base_url, prompt_len=args.prompt_len, output_len=args.output_len,
                         concurrency=args.concurrency, vocab_size=O200K_TEXT_IDS, timeout=1800.0)
    with PeakTreeRss(pid) as peak:
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpt_oss_vs_llama_cpp", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=Path(".cache/bench/gpt-oss-20b-widths"))
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--requests", type=int, default=4, help="per concurrency level")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp's -t (gptserve uses torch's default)")
    parser.add_argument("--outtype", default="bf16", help="GGUF type of the non-expert weights (experts stay MXFP4)")
    parser.add_argument("--server-args", default=GPTSERVE_ARGS)
    args = parser.parse_args(argv)
    checkpoint, gguf = args.dir / "hf", args.dir / f"model-{args.outtype}.gguf"
    if not (checkpoint / "config.json").is_file():
        write_checkpoint(checkpoint, CONFIG_20B | {"num_hidden_layers": args.layers})
    llama_cpp.build(jobs=2)
    if not gguf.is_file():
        llama_cpp.convert(checkpoint, gguf, args.outtype)
    rows = []
    for round_index in range(args.rounds):
        ours = BenchServer(["--model", f"gpt-oss={checkpoint}", *shlex.split(args.server_args)],
                           args.dir / f"gptserve-{round_index}.log", startup_timeout=900)
        with ours as server:
            rows.append(("gptserve", measure(server, server.pid, args)))
        with LlamaServer(gguf, args.threads, args.dir / f"llama-{round_index}.log") as server:
            rows.append(("llama.cpp", measure(server, server.pid, args)))
        print(table(rows, args.concurrency), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
