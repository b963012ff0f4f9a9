"""``python -m bench.gpt2_vs_llama_cpp``: GPT-2-124M served by gptserve and by llama.cpp's server, side by side.

The random GPT-2-124M checkpoint of the other benchmarks (bench/make_gpt2_checkpoint.py), converted to an f16
GGUF by llama.cpp's own converter; llama.cpp's server built from the pinned source (bench/llama_cpp.py). Each
server in turn, alternated for ``--rounds`` rounds, one at a time, under the same closed-loop load (P=128,
G=128, C=1 by default): output tok/s, TTFT and TPOT medians, peak RSS. gptserve runs the way its C=1 is best
on CPU: weights and KV cache in bf16 (fp32 arithmetic). Issue 19 asks for gptserve's C=1 >= llama.cpp's here.
``--paired N`` runs both servers at once instead and sends them N pairs of single requests in turn
(bench/paired.py): a C=1 comparison that holds however the machine's speed moves meanwhile. Never run in CI.
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from bench import llama_cpp
from bench.loadgen import BenchConfig
from bench.make_gpt2_checkpoint import write_gpt2_checkpoint
from bench.paired import paired
from bench.server_process import BenchServer
from bench.side_by_side import LlamaServer, measure, table

GPTSERVE_ARGS = "--cpu-weight-dtype bfloat16 --kv-cache-dtype bfloat16"
GPT2_TEXT_IDS = 50256  # prompts draw ids below <|endoftext|>


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpt2_vs_llama_cpp", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=Path(".cache/bench/gpt2-124m"))
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1])
    parser.add_argument("--requests", type=int, default=8, help="per concurrency level")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp's -t (gptserve uses torch's default)")
    parser.add_argument("--server-args", default=GPTSERVE_ARGS)
    parser.add_argument("--paired", type=int, metavar="N", help="N pairs of C=1 requests, both servers up at once")
    args = parser.parse_args(argv)
    if not (args.checkpoint / "config.json").is_file():
        write_gpt2_checkpoint(args.checkpoint)
    gguf = args.checkpoint.parent / f"{args.checkpoint.name}-f16.gguf"
    llama_cpp.build(jobs=2)
    if not gguf.is_file():
        llama_cpp.convert(args.checkpoint, gguf, "f16")
    logs = args.checkpoint.parent / "gpt2-vs-llama-cpp"
    logs.mkdir(exist_ok=True)
    slots = 1 if args.paired else max(args.concurrency)
    if args.paired:
        ours = BenchServer(["--model", f"gpt2={args.checkpoint}", *shlex.split(args.server_args),
                            "--kv-cache-tokens", "1024"], logs / "gptserve-paired.log")
        with ours as server, LlamaServer(gguf, args.threads, logs / "llama-paired.log", parallel=1,
                                         context=1024) as llama:
            config = BenchConfig(prompt_len=args.prompt_len, output_len=args.output_len, vocab_size=GPT2_TEXT_IDS)
            print(paired({"gptserve": server.base_url, "llama.cpp": llama.base_url}, config, args.paired), flush=True)
        return 0
    rows = []
    for round_index in range(args.rounds):
        # the KV pool matches llama.cpp's context (-c below), so neither peak RSS counts a bigger cache
        ours = BenchServer(["--model", f"gpt2={args.checkpoint}", *shlex.split(args.server_args),
                            "--kv-cache-tokens", str(slots * 1024)], logs / f"gptserve-{round_index}.log")
        with ours as server:
            rows.append(("gptserve", measure(server, args, GPT2_TEXT_IDS)))
        with LlamaServer(gguf, args.threads, logs / f"llama-{round_index}.log", parallel=slots,
                         context=slots * 1024) as server:
            rows.append(("llama.cpp", measure(server, args, GPT2_TEXT_IDS)))
        print(table(rows, args.concurrency), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
