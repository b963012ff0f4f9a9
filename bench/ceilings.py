"""This machine's two ceilings for CPU inference with torch, and what they bound for GPT-2-124M.

Memory read bandwidth bounds batch-1 decode (every step streams all weights); fp32 GEMM FLOP/s bounds
large-batch decode and prefill. Each figure is the best of several timings, since on a shared machine the
best run is the one least disturbed by neighbours; the median is reported beside it.

    python -m bench.ceilings [--threads N] [--repeats 10] [--json-out ceilings.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from bench.model_cost import GPT2_124M


@dataclass(slots=True)
class Rate:
    """Operations (bytes or FLOPs) per second."""

    best: float
    median: float


def measure_rate(work: Callable[[], object], amount: float, repeats: int, min_seconds: float = 0.05) -> Rate:
    """Time ``work`` (which does ``amount`` operations) in batches of calls long enough to time reliably."""
    work()
    start = time.perf_counter()
    work()
    calls = max(1, int(min_seconds / max(time.perf_counter() - start, 1e-9)))
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            work()
        rates.append(amount * calls / (time.perf_counter() - start))
    return Rate(best=max(rates), median=statistics.median(rates))


def read_bandwidth(megabytes: int, repeats: int) -> Rate:
    """Bytes/s read by a sum over a tensor far larger than any cache."""
    x = torch.ones(megabytes * 2**20 // 4, dtype=torch.float32)
    return measure_rate(x.sum, x.nbytes, repeats)


def kernel_read_bandwidths(megabytes: int, repeats: int) -> dict[str, Rate]:
    """Bytes/s the project's bf16 weight kernels stream at one row, over a packed weight of ``megabytes``: on
    some CPUs their prefetched reads outrun the plain sum (25-31 against 24-27 GB/s on a two-core Xeon, bench/
    NOTES.md, session 15), and a bound must use the fastest read the machine gives. Empty where the kernels are
    not built; the vdpbf16ps one only where the CPU has AVX512-BF16."""
    from models.cpu_isa import cpu_isa
    from models.cpu_kernels import cpu_kernels_loaded

    if not cpu_kernels_loaded():
        return {}
    k = 2880
    groups = megabytes * 2**20 // (k * 64)
    # Every word bf16 1.0: written (untouched pages would all read one zero page), and normal (subnormal
    # weights take the fp32 FMAs' slow path on Intel)
    packed = torch.full((groups, k // 2, 32, 2), 0x3F80, dtype=torch.int16)
    n = groups * 32
    ops, x = torch.ops.gptserve, torch.ones(1, k)
    kernels: dict[str, Callable[[], object]] = {"bf16_linear": lambda: ops.bf16_linear(x, packed, None, n)}
    if cpu_isa().avx512_bf16:
        kernels["bf16_dot_linear"] = lambda: ops.bf16_dot_linear(x.bfloat16(), packed, None, n)
    return {name: measure_rate(work, packed.nbytes, repeats) for name, work in kernels.items()}


def gemm_rate(m: int, k: int, n: int, repeats: int) -> Rate:
    """fp32 FLOP/s of an (m x k) @ (k x n) product into a preallocated output."""
    a, b, out = torch.randn(m, k), torch.randn(k, n), torch.empty(m, n)
    return measure_rate(lambda: torch.mm(a, b, out=out), 2 * m * k * n, repeats)


def gpt2_limits(bandwidth: Rate, gemm_large: Rate, gemm_decode: Rate, context: int, prompt_len: int,
                output_len: int) -> dict:
    """Token rates the ceilings allow GPT-2-124M, as [median, best] ranges."""
    shape = GPT2_124M
    per_token = shape.flops_per_token(context)
    per_output = shape.request_flops(prompt_len, output_len) / output_len

    def span(rate: Rate, cost: float) -> list[float]:
        return [rate.median / cost, rate.best / cost]

    return {
        "params": shape.params,
        "weight_bytes_per_step_fp32": shape.weight_bytes_per_step(4),
        "flops_per_token": per_token,
        "context": context,
        "batch1_tok_s_fp32": span(bandwidth, shape.weight_bytes_per_step(4)),
        "batch1_tok_s_16bit_weights": span(bandwidth, shape.weight_bytes_per_step(2)),
        "large_batch_tok_s_decode_gemm": span(gemm_decode, per_token),
        "large_batch_tok_s_2048_gemm": span(gemm_large, per_token),
        "mix_prompt_len": prompt_len,
        "mix_output_len": output_len,
        "mix_output_tok_s": span(gemm_decode, per_output),
    }


def report_lines(result: dict) -> list[str]:
    g, lim = 1e9, result["gpt2_124m"]

    def rate(name: str, unit: str) -> str:
        r = result[name]
        return f"best {r['best'] / g:.1f} {unit} (median {r['median'] / g:.1f})"

    def span(name: str) -> str:
        low, high = lim[name]
        return f"{low:.0f}-{high:.0f} tok/s"

    return [
        f"threads: {result['threads']}",
        f"memory read bandwidth:          {rate('read_bandwidth', 'GB/s')}",
        f"fp32 GEMM 2048x2048 @ 2048x2048: {rate('gemm_2048', 'GFLOP/s')}",
        f"fp32 GEMM 64x768 @ 768x2304:     {rate('gemm_64x768x2304', 'GFLOP/s')}",
        f"GPT-2-124M: {lim['params'] / 1e6:.1f}M params, {lim['weight_bytes_per_step_fp32'] / 1e6:.0f} MB of fp32 "
        f"weights read per decode step, {lim['flops_per_token'] / 1e6:.0f} MFLOP per token at context {lim['context']}",
        f"  batch-1 decode, bandwidth bound:  {span('batch1_tok_s_fp32')} fp32, "
        f"{span('batch1_tok_s_16bit_weights')} with 16-bit weights",
        f"  large-batch decode, GEMM bound:   {span('large_batch_tok_s_decode_gemm')} at the 64-row GEMM rate, "
        f"{span('large_batch_tok_s_2048_gemm')} at the 2048^3 rate",
        f"  P={lim['mix_prompt_len']}/G={lim['mix_output_len']} with its prefill:    "
        f"{span('mix_output_tok_s')} output at the 64-row GEMM rate",
    ]


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.ceilings", description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=available_cores(), help="torch threads (default: usable cores)")
    p.add_argument("--repeats", type=int, default=10, help="timings per measurement; the best is reported")
    p.add_argument("--bandwidth-mb", type=int, default=512, help="size of the tensor summed for bandwidth")
    p.add_argument("--context", type=int, default=192, help="attention context for the per-token FLOPs")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--json-out", help="write the measurements and limits here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rates = {
        "read_bandwidth": read_bandwidth(args.bandwidth_mb, args.repeats),
        "gemm_2048": gemm_rate(2048, 2048, 2048, args.repeats),
        "gemm_64x768x2304": gemm_rate(64, 768, 2304, args.repeats),
    }
    limits = gpt2_limits(*rates.values(), args.context, args.prompt_len, args.output_len)
    result = {"threads": args.threads, **{k: asdict(v) for k, v in rates.items()}, "gpt2_124m": limits}
    print("\n".join(report_lines(result)))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
