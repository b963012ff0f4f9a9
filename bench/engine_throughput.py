"""``python -m bench.engine_throughput``: the served benchmark's closed loop run on LLMEngine in this process.

C clients, each sending its next P-token request (G tokens out, greedy, ignore_eos) as soon as the last one
ends, 2C requests in all after one warm-up: what ``bench.loadgen --concurrency C`` sends to a server, here with
no HTTP, no front end and no process boundary. Output tok/s here against the served figure at the same C is
what serving costs. The engine gets the server's defaults (EngineConfig()) and the same OpenMP spin as a core.

    python -m bench.engine_throughput [--cpu-weight-dtype bfloat16 --kv-cache-dtype bfloat16] [--concurrency 1 64]
    python -m bench.engine_throughput --device cuda --dtype bfloat16
"""

from __future__ import annotations

import os

os.environ.setdefault("GOMP_SPINCOUNT", "100000")  # as server/cli.py sets it for the engine cores

import argparse  # noqa: E402 (the OpenMP setting must precede torch's import, below)
import random  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from bench.make_gpt2_checkpoint import write_gpt2_checkpoint  # noqa: E402
from models.loader import LoadedModel, load_model  # noqa: E402
from server.config import EngineConfig  # noqa: E402
from server.engine.engine import LLMEngine  # noqa: E402
from server.engine.sampling_params import SamplingParams  # noqa: E402


def closed_loop(loaded: LoadedModel, config: EngineConfig, concurrency: int, prompt_len: int, output_len: int,
                seed: int) -> float:
    """Output tok/s over 2C requests with C always in flight (after one unmeasured warm-up request)."""
    engine = LLMEngine(loaded, config)
    rng = random.Random(seed)
    params = SamplingParams(max_tokens=output_len, min_tokens=output_len, temperature=0.0, ignore_eos=True)
    issued = 0

    def issue() -> None:
        nonlocal issued
        engine.add_request(f"r{issued}", [rng.randrange(50000) for _ in range(prompt_len)], params)
        issued += 1

    def run_until(done: int, total: int) -> int:
        finished, tokens = 0, 0
        while finished < done:
            for _, out in engine.step():
                tokens += len(out.new_token_ids)
                if out.finish_reason is not None:
                    finished += 1
                    if issued < total:
                        issue()
        return tokens

    issue()
    run_until(1, 1)  # warm-up
    total = 1 + 2 * concurrency
    started = time.perf_counter()
    for _ in range(concurrency):
        issue()
    tokens = run_until(2 * concurrency, total)
    return tokens / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.engine_throughput", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, default=Path(".cache/bench/gpt2-124m"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--cpu-weight-dtype", default="float32")
    p.add_argument("--kv-cache-dtype", default="auto")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 64])
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    args = p.parse_args(argv)
    if not (args.checkpoint / "config.json").is_file():
        write_gpt2_checkpoint(args.checkpoint)
    loaded = load_model(args.checkpoint, dtype=args.dtype, device=args.device, cpu_weight_dtype=args.cpu_weight_dtype)
    for c in args.concurrency:
        rate = closed_loop(loaded, EngineConfig(kv_cache_dtype=args.kv_cache_dtype), c, args.prompt_len,
                           args.output_len, seed=c)
        print(f"in-process C={c}: {rate:.1f} out tok/s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
