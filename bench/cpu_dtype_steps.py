"""GPT-2-124M on CPU in fp32 and bf16 side by side: a 1k-token prefill and a C=64 decode step.

The model-level check of ``--dtype auto``'s CPU rule (models/cpu_isa.py); bench/cpu_bf16_matmul.py has the
matmuls alone. The two dtypes alternate run by run so that a neighbour's load hits both alike.

    python -m bench.cpu_dtype_steps [--checkpoint .cache/bench/gpt2-124m] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from bench.engine_steps import decode_step_ms
from bench.make_gpt2_checkpoint import write_gpt2_checkpoint
from models.cpu_isa import cpu_isa
from models.forward_batch import ForwardBatch
from models.kv_cache import PagedKVCache
from models.loader import LoadedModel, load_model

BLOCK = 16


@torch.inference_mode()
def prefill_ms(loaded: LoadedModel, prompt_len: int) -> float:
    """Wall milliseconds of one prompt's prefill, its last position's logits included."""
    model = loaded.model
    blocks = -(-prompt_len // BLOCK)
    cache = PagedKVCache(model.kv_cache_spec(), blocks, BLOCK, dtype=loaded.dtype, device=loaded.device)
    tokens = [(7 * i) % 50000 for i in range(prompt_len)]
    batch = ForwardBatch.build([tokens], [0], [list(range(blocks))], BLOCK, loaded.device)
    start = time.perf_counter()
    model.compute_logits(model(batch, cache)[-1:])
    return 1e3 * (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.cpu_dtype_steps", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, default=Path(".cache/bench/gpt2-124m"))
    p.add_argument("--prompt-len", type=int, default=1000)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    if not (args.checkpoint / "config.json").is_file():
        write_gpt2_checkpoint(args.checkpoint)
    torch.set_num_threads(2)
    models = {dtype: load_model(args.checkpoint, dtype=dtype, device="cpu") for dtype in ("float32", "bfloat16")}
    prefill: dict[str, list[float]] = {dtype: [] for dtype in models}
    decode: dict[str, list[float]] = {dtype: [] for dtype in models}
    for loaded in models.values():
        prefill_ms(loaded, 64)  # warm-up: oneDNN primitives, kernel load
    for _ in range(args.rounds):
        for dtype, loaded in models.items():
            prefill[dtype].append(prefill_ms(loaded, args.prompt_len))
            decode[dtype].append(decode_step_ms(loaded, args.concurrency, 128, 8, True, "auto"))
    print(f"ISA: {cpu_isa()}; ms, best / median of {args.rounds}")
    for dtype in models:
        p, d = prefill[dtype], decode[dtype]
        print(f"{dtype:9s} prefill {args.prompt_len}: {min(p):7.0f} / {statistics.median(p):7.0f}"
              f"   decode step C={args.concurrency}: {min(d):6.0f} / {statistics.median(d):6.0f}")


if __name__ == "__main__":
    main()
