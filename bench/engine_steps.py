"""Decode step time of the engine alone (no HTTP): C sequences with P-token prompts, all decoding.

Separates what the engine and model cost from what serving adds on top (tokenization, streaming, the event
loop). Each step's wall time includes its device sync (the sampler reads the tokens back).

    python -m bench.engine_steps [--device cuda --dtype bfloat16] [--enforce-eager] [--cpu-weight-dtype bfloat16]
                                 [--kv-cache-dtype bfloat16] [--concurrency 1 16 64]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

from bench.make_gpt2_checkpoint import write_gpt2_checkpoint
from models.loader import load_model
from server.engine.engine import EngineConfig, LLMEngine
from server.engine.sampling_params import SamplingParams


def decode_step_ms(loaded, concurrency: int, prompt_len: int, steps: int, enforce_eager: bool,
                   kv_cache_dtype: str) -> float:
    """Median wall milliseconds of a step in which all ``concurrency`` sequences decode one token."""
    engine = LLMEngine(loaded, EngineConfig(
        max_num_seqs=concurrency, max_num_batched_tokens=max(512, concurrency),
        kv_cache_tokens=concurrency * (prompt_len + steps + 64), enforce_eager=enforce_eager,
        kv_cache_dtype=kv_cache_dtype,
    ))
    rng = random.Random(0)
    params = SamplingParams(max_tokens=steps + 32, temperature=0.0, ignore_eos=True)
    for i in range(concurrency):
        engine.add_request(f"r{i}", [rng.randrange(50000) for _ in range(prompt_len)], params)
    running = engine.scheduler.running
    while engine.scheduler.waiting or any(s.num_computed_tokens < s.num_prompt_tokens for s in running):
        engine.step()
    for _ in range(3):
        engine.step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.engine_steps", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, default=Path(".cache/bench/gpt2-124m"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--cpu-weight-dtype", default="float32", help="bfloat16: weights streamed as bf16 on CPU")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    p.add_argument("--kv-cache-dtype", default="auto", help="bfloat16: a bf16 KV cache under a float32 model")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--json-out")
    args = p.parse_args(argv)
    if not (args.checkpoint / "config.json").is_file():
        write_gpt2_checkpoint(args.checkpoint)
    loaded = load_model(args.checkpoint, dtype=args.dtype, device=args.device, cpu_weight_dtype=args.cpu_weight_dtype)
    mode = "graphs" if loaded.device.type == "cuda" and not args.enforce_eager else "eager"
    rows = []
    for c in args.concurrency:
        ms = decode_step_ms(loaded, c, args.prompt_len, args.steps, args.enforce_eager, args.kv_cache_dtype)
        rows.append({"concurrency": c, "step_ms": ms, "tok_s": 1e3 * c / ms})
        print(f"{args.device} {loaded.dtype} KV {args.kv_cache_dtype} {mode} C={c:>3} "
              f"P={args.prompt_len}: decode step {ms:.2f} ms -> {1e3 * c / ms:.0f} tok/s", flush=True)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"device": args.device, "dtype": str(loaded.dtype), "mode": mode,
                       "kv_cache_dtype": args.kv_cache_dtype, "prompt_len": args.prompt_len, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
