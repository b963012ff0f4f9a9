"""bf16 against fp32 matmul FLOP/s on this CPU, through torch.matmul and through the oneDNN inner product the
models use (models/onednn_linear.py): the numbers behind ``--dtype auto``'s CPU rule (models/cpu_isa.py).

Shapes are GPT-2-124M's: a batch-64 decode step's qkv projection (64x768 @ 768x2304) and a 1k-token prefill's
MLP up-projection (1024x768 @ 768x3072). Best and median of several timings (bench/ceilings.py).

    python -m bench.cpu_bf16_matmul [--threads 2] [--repeats 10]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from bench.ceilings import Rate, measure_rate
from models.cpu_isa import cpu_isa

SHAPES = [(64, 768, 2304), (1024, 768, 3072)]


def matmul_work(m: int, k: int, n: int, dtype: torch.dtype) -> Callable[[], object]:
    x, w = torch.randn(m, k).to(dtype), torch.randn(n, k).to(dtype)
    return lambda: torch.matmul(x, w.T)


def onednn_work(m: int, k: int, n: int, dtype: torch.dtype) -> Callable[[], object]:
    x = torch.randn(m, k).to(dtype)
    w = torch.ops.mkldnn._reorder_linear_weight(torch.randn(n, k).to(dtype), None)
    return lambda: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"ISA: {cpu_isa()}, torch {torch.__version__}, {args.threads} threads; GFLOP/s best (median)")
    for m, k, n in SHAPES:
        for path, work in (("torch.matmul", matmul_work), ("oneDNN", onednn_work)):
            rates: dict[torch.dtype, Rate] = {}
            for dtype in (torch.float32, torch.bfloat16):
                rates[dtype] = measure_rate(work(m, k, n, dtype), 2 * m * k * n, args.repeats)
            fp32, bf16 = rates[torch.float32], rates[torch.bfloat16]
            print(f"{m}x{k}x{n} {path:12s} fp32 {fp32.best / 1e9:6.0f} ({fp32.median / 1e9:4.0f})  "
                  f"bf16 {bf16.best / 1e9:6.0f} ({bf16.median / 1e9:4.0f})  bf16/fp32 {bf16.best / fp32.best:.2f}")


if __name__ == "__main__":
    main()
