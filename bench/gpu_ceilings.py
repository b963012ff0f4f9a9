"""A CUDA GPU's two ceilings, and what they bound for GPT-2-124M in bfloat16.

Device memory bandwidth (a large device-to-device copy, counting bytes read plus bytes written) bounds
batch-1 decode, which streams every weight each step; the bf16 matrix rate bounds large batches. Timed with
CUDA events after warm-up, on random data (zeros run faster on this hardware), median of the repeats.

    python -m bench.gpu_ceilings [--repeats 20] [--json-out gpu_ceilings.json]
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from bench.model_cost import GPT2_124M


def median_ms(work, repeats: int) -> float:
    """Median milliseconds of one ``work()`` on the current stream, events around each call."""
    for _ in range(3):
        work()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        work()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth(megabytes: int, repeats: int) -> float:
    """Bytes/s moved by a device-to-device copy (read + write)."""
    src = torch.randn(megabytes * 2**20 // 4, device="cuda")
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), repeats)
    return 2 * src.nbytes / (ms / 1e3)


def gemm_rate(m: int, k: int, n: int, dtype: torch.dtype, repeats: int) -> float:
    """FLOP/s of an (m x k) @ (k x n) product in ``dtype``."""
    a = torch.randn(m, k, device="cuda", dtype=dtype)
    b = torch.randn(k, n, device="cuda", dtype=dtype)
    out = torch.empty(m, n, device="cuda", dtype=dtype)
    ms = median_ms(lambda: torch.mm(a, b, out=out), repeats)
    return 2 * m * k * n / (ms / 1e3)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_ceilings", description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--copy-mb", type=int, default=4096, help="size of the copied tensor (far above L2)")
    p.add_argument("--json-out")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device")
    bandwidth = copy_bandwidth(args.copy_mb, args.repeats)
    gemm_big = gemm_rate(8192, 8192, 8192, torch.bfloat16, args.repeats)
    gemm_decode = gemm_rate(64, 768, 2304, torch.bfloat16, args.repeats)
    weight_bytes = GPT2_124M.weight_bytes_per_step(2)
    result = {
        "device": torch.cuda.get_device_name(),
        "copy_bandwidth_bytes_s": bandwidth,
        "bf16_gemm_8192_flop_s": gemm_big,
        "bf16_gemm_64x768x2304_flop_s": gemm_decode,
        "gpt2_124m_bf16_weight_bytes_per_step": weight_bytes,
        "gpt2_124m_batch1_tok_s_limit": bandwidth / weight_bytes,
    }
    print(f"device: {result['device']}")
    print(f"copy bandwidth (read + write):   {bandwidth / 1e12:.2f} TB/s")
    print(f"bf16 GEMM 8192^3:                {gemm_big / 1e12:.0f} TFLOP/s")
    print(f"bf16 GEMM 64x768 @ 768x2304:     {gemm_decode / 1e12:.1f} TFLOP/s")
    print(f"GPT-2-124M bf16: {weight_bytes / 1e6:.0f} MB of weights per decode step -> batch-1 decode bound "
          f"{bandwidth / weight_bytes:.0f} steps/s ({1e3 * weight_bytes / bandwidth:.3f} ms per step); at batch 64 "
          f"the same bytes give {64 * bandwidth / weight_bytes:.0f} tok/s before attention's KV reads")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
