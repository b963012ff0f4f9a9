"""``python -m bench.gpt_oss_vs_llama_cpp``: GPT-OSS served by gptserve and by llama.cpp, side by side, one table.

Writes (once, cached) a random checkpoint of the gpt-oss-20b widths with fewer layers (hidden 2880, 64/8 heads,
32 experts top-4, MXFP4 experts, sinks, sliding window; 6 layers by default) in the HF layout openai ships, with
the tokenizer made by transformers' converter; converts it with llama.cpp's own ``convert_hf_to_gguf.py``;
builds llama.cpp's server from the pinned source (bench/llama_cpp.py); then serves each in turn, alternated for
``--rounds`` rounds, one server at a time, and measures the same closed-loop load (P=512, G=64, C=1 and 4):
output tok/s, TTFT and TPOT medians, and the peak resident memory of the server's whole process tree. Never
run in CI (the checkpoint is ~4 GB and the build ~10 minutes).

Each round also measures this machine's read bandwidth (bench.ceilings, between the servers, none running: the
fastest of a plain sum and the project's bf16 weight kernels at one row) and prints the C=1 decode's bound: the
bytes one decoded token reads (bf16 unembedding and attention weights, the router, four MXFP4 experts a layer,
the KV cache) over that bandwidth; issue 20 asks for a C=1 TPOT within 15% of it. ``--paired N`` runs both
servers at once instead and sends them N pairs of single requests in turn (bench/paired.py): a C=1 comparison
that holds however the machine's speed moves meanwhile.
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

from bench import llama_cpp
from bench.ceilings import kernel_read_bandwidths, read_bandwidth
from bench.gpt_oss_20b_memory import CONFIG_20B, write_checkpoint
from bench.loadgen import BenchConfig
from bench.paired import paired
from bench.server_process import BenchServer
from bench.side_by_side import LlamaServer, measure, table

# The KV pool matches llama.cpp's (-np 4 -c 4096 below), so neither server's peak memory counts a bigger cache.
# bf16 compute (a bf16 KV pool with it): prefill experts through bf16 GEMMs, decode's few rows through the MXFP4
# kernel; against --cpu-weight-dtype bfloat16 (fp32 activations) it prefilled in 3.8 s instead of 4.9 and ran
# C=4 at 12.3 out tok/s instead of 7.2 (bench/NOTES.md, session 11).
GPTSERVE_ARGS = ("--keep-experts-packed --dtype bfloat16 --max-num-batched-tokens 2048 --max-num-seqs 4 "
                 "--kv-cache-tokens 4096")
O200K_TEXT_IDS = 199998  # prompts draw ids below the harmony specials


MXFP4_BYTES_PER_VALUE = 17 / 32  # 16 bytes of codes and one scale byte a block of 32 values


def decode_bytes_per_token(config: dict, context: int) -> float:
    """Bytes a C=1 decode step reads at ``context`` tokens: every bf16 weight but the embedding (one row), the
    four selected experts of each layer in MXFP4, and the bf16 KV cache (sliding layers: their window)."""
    hidden, head_dim, layers = config["hidden_size"], config["head_dim"], config["num_hidden_layers"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    attention = hidden * (heads + 2 * kv_heads) * head_dim + heads * head_dim * hidden
    router = hidden * config["num_local_experts"]
    expert = 3 * hidden * config["intermediate_size"]  # gate_up (2I x H) and down (H x I)
    per_layer = 2 * (attention + router) + config["num_experts_per_tok"] * expert * MXFP4_BYTES_PER_VALUE
    kv = sum(2 * kv_heads * head_dim * 2 * (min(context, config["sliding_window"]) if kind == "sliding_attention"
                                             else context) for kind in config["layer_types"])
    return 2 * config["vocab_size"] * hidden + layers * per_layer + kv


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
    parser.add_argument("--paired", type=int, metavar="N", help="N pairs of C=1 requests, both servers up at once")
    args = parser.parse_args(argv)
    checkpoint, gguf = args.dir / "hf", args.dir / f"model-{args.outtype}.gguf"
    if not (checkpoint / "config.json").is_file():
        write_checkpoint(checkpoint, CONFIG_20B | {"num_hidden_layers": args.layers})
    llama_cpp.build(jobs=2)
    if not gguf.is_file():
        llama_cpp.convert(checkpoint, gguf, args.outtype)
    if args.paired:
        ours = BenchServer(["--model", f"gpt-oss={checkpoint}", *shlex.split(args.server_args)],
                           args.dir / "gptserve-paired.log", startup_timeout=900)
        with ours as server, LlamaServer(gguf, args.threads, args.dir / "llama-paired.log", parallel=4,
                                         context=4096) as llama:
            config = BenchConfig(prompt_len=args.prompt_len, output_len=args.output_len, vocab_size=O200K_TEXT_IDS,
                                 timeout=1800.0)
            print(paired({"gptserve": server.base_url, "llama.cpp": llama.base_url}, config, args.paired), flush=True)
        return 0
    rows = []
    for round_index in range(args.rounds):
        ours = BenchServer(["--model", f"gpt-oss={checkpoint}", *shlex.split(args.server_args)],
                           args.dir / f"gptserve-{round_index}.log", startup_timeout=900)
        with ours as server:
            rows.append(("gptserve", measure(server, args, O200K_TEXT_IDS)))
        with LlamaServer(gguf, args.threads, args.dir / f"llama-{round_index}.log", parallel=4, context=4096) as server:
            rows.append(("llama.cpp", measure(server, args, O200K_TEXT_IDS)))
        print(table(rows, args.concurrency), flush=True)
        if 1 in args.concurrency:
            reads = {"sum": read_bandwidth(1024, repeats=5).best}
            reads |= {name: rate.best for name, rate in kernel_read_bandwidths(1024, repeats=5).items()}
            fastest = max(reads, key=reads.__getitem__)
            per_token = decode_bytes_per_token(json.loads((checkpoint / "config.json").read_text()),
                                               args.prompt_len + args.output_len // 2)
            bound_ms = 1e3 * per_token / reads[fastest]
            print(f"C=1 TPOT bandwidth bound: {per_token / 1e9:.3f} GB a token at {reads[fastest] / 1e9:.1f} GB/s "
                  f"({fastest}; reads " + ", ".join(f"{name} {rate / 1e9:.1f}" for name, rate in reads.items()) +
                  f" GB/s) = {bound_ms:.1f} ms; gptserve's C=1 TPOT is {rows[-2][1]['c1_tpot_ms'] / bound_ms:.2f}x it",
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
