"""``python -m bench.mxfp4_bf16_expert``: one gpt-oss-20b expert run (gate_up 5760x2880, down 2880x2880) on
bf16 (or ``--dtype float32``) rows, through each way a model can multiply MXFP4 weights, to pick the
crossovers in models/mxfp4.py.

    kernel   the fp32 C++ kernel (bf16 rows widened to fp32, its result rounded back to bf16)
    bf16kernel  its bf16 form (models/csrc/mxfp4_bf16_linear.cpp), bf16 rows on a CPU with AVX512-BF16
    dots     the vdpbf16ps dots on the matrix decoded 32 outputs at a time (models/csrc/mxfp4_dot_linear.cpp),
             bf16 rows on a CPU with AVX512-BF16
    gemm     the matrix dequantized whole (models/csrc/mxfp4_dequantize.cpp, into a reused buffer), one GEMM
    tilesN   the same a tile of N weight rows at a time
    dequant  the dequantization alone (both matrices)

The ways alternate within each repeat; medians and bests of the repeats in ms, with the load average.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from models.cpu_isa import cpu_isa
from models.cpu_kernels import cpu_kernels_loaded
from models.mxfp4 import dequantized, packed_shapes

WIDTH = 2880


def random_matrix(out_features: int, in_features: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    blocks_shape, scales_shape = packed_shapes((out_features, in_features))
    blocks = torch.randint(0, 256, blocks_shape, generator=g, dtype=torch.uint8)
    return blocks, torch.randint(119, 122, scales_shape, generator=g, dtype=torch.uint8)


def kernel(x: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return torch.ops.gptserve.mxfp4_linear(x.float(), blocks, scales, None).to(x.dtype)


def bf16_kernel(x: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    counts = torch.tensor([len(x)])
    return torch.ops.gptserve.mxfp4_grouped_linear_bf16(x, counts, blocks.unsqueeze(0), scales.unsqueeze(0), None)


def dots(x: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return torch.ops.gptserve.mxfp4_dot_linear(x, blocks, scales, None)


def gemm(x: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return F.linear(x, dequantized(blocks, scales, x.dtype))


def tiles(rows: int) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    def run(x: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        out = x.new_empty(len(x), len(blocks))
        for start in range(0, len(blocks), rows):
            weight = dequantized(blocks[start : start + rows], scales[start : start + rows], x.dtype)
            out[:, start : start + rows] = F.linear(x, weight)
        return out

    return run


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.mxfp4_bf16_expert", description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8, 16, 32, 64, 128])
    p.add_argument("--tiles", type=int, nargs="*", default=[512, 1440])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    args = p.parse_args(argv)
    assert cpu_kernels_loaded()
    g = torch.Generator().manual_seed(0)
    gate_up, down = random_matrix(2 * WIDTH, WIDTH, g), random_matrix(WIDTH, WIDTH, g)
    dtype = getattr(torch, args.dtype)
    bf16_ways = {"bf16kernel": bf16_kernel, "dots": dots} if dtype == torch.bfloat16 and cpu_isa().avx512_bf16 else {}
    ways = {"kernel": kernel} | bf16_ways | {"gemm": gemm} | {f"tiles{n}": tiles(n) for n in args.tiles}
    print(f"{args.dtype} threads={torch.get_num_threads()} loadavg {os.getloadavg()[0]:.2f}")
    with torch.inference_mode():
        times: dict[str, list[float]] = {}
        for _ in range(args.repeats + 2):
            began = time.perf_counter()
            dequantized(*gate_up, dtype), dequantized(*down, dtype)
            times.setdefault("dequant", []).append(1e3 * (time.perf_counter() - began))
        print(f"dequant both matrices: median {statistics.median(times['dequant'][2:]):.1f} ms, "
              f"best {min(times['dequant']):.1f}")
        for rows in args.rows:
            x = torch.randn(rows, WIDTH, generator=g).to(dtype)
            times = {name: [] for name in ways}
            for _ in range(args.repeats):
                for name, way in ways.items():
                    began = time.perf_counter()
                    way(way(x, *gate_up)[:, ::2].contiguous(), *down)
                    times[name].append(1e3 * (time.perf_counter() - began))
            cells = [f"{name} {statistics.median(t):.1f} ({min(t):.1f})" for name, t in times.items()]
            print(f"rows {rows:4d}: " + ", ".join(cells) + f"  loadavg {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
