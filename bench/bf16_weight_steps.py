"""``python -m bench.bf16_weight_steps``: GPT-2-124M with ``--cpu-weight-dtype bfloat16``: memory and the two
step shapes that run the many-row path (a 512-token prefill, a C=64 decode step).

For a before/after of the weight layers, run it once per tree, alternately (one process each, so each
reads its own peak RSS). Prints one JSON line: RSS after load and at the end (VmHWM), and per round the
prefill and decode-step milliseconds.

    python -m bench.bf16_weight_steps [--checkpoint .cache/bench/gpt2-124m] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from bench.cpu_dtype_steps import prefill_ms
from bench.engine_steps import decode_step_ms
from bench.make_gpt2_checkpoint import write_gpt2_checkpoint
from models.loader import load_model


def status_gib(field: str) -> float:
    """A /proc/self/status memory field (VmRSS, VmHWM, RssAnon) in GiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2**20
    raise KeyError(field)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.bf16_weight_steps", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, default=Path(".cache/bench/gpt2-124m"))
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    if not (args.checkpoint / "config.json").is_file():
        write_gpt2_checkpoint(args.checkpoint)
    torch.set_num_threads(args.threads)
    loaded = load_model(args.checkpoint, dtype="float32", device="cpu", cpu_weight_dtype="bfloat16")
    report: dict = {"rss_after_load_gib": status_gib("VmRSS"), "peak_rss_load_gib": status_gib("VmHWM")}
    prefill_ms(loaded, 64)  # warm-up
    prefill, decode = [], []
    for _ in range(args.rounds):
        prefill.append(prefill_ms(loaded, args.prompt_len))
        decode.append(decode_step_ms(loaded, args.concurrency, 128, 8, True, "auto"))
    report |= {"prefill_ms": prefill, "decode_step_ms": decode, "prefill_median": statistics.median(prefill),
               "decode_median": statistics.median(decode), "peak_rss_gib": status_gib("VmHWM")}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
