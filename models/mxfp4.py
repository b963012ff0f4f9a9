"""MXFP4, the format GPT-OSS ships its expert weights in: 4-bit E2M1 values sharing one power-of-two scale per 32.

A tensor of logical shape [..., N] is stored as ``blocks`` uint8 [..., N/32, 16] (two values per byte, low
nibble first) and ``scales`` uint8 [..., N/32] (an E8M0 exponent with bias 127). Every MXFP4 value times a
power of two is exact in float32 and bfloat16, so dequantizing loses nothing there.

Memory for the weights of the real models, in GiB (2^30 bytes). "Rest" is everything but the experts:
embedding, unembedding, attention, router, norms, biases. 20b: 24 layers x 32 experts; 120b: 36 layers x 128
experts; hidden = intermediate = 2880, so 3 * 2880^2 values per expert.

| what                                      | gpt-oss-20b | gpt-oss-120b  |
|-------------------------------------------|-------------|---------------|
| experts kept packed (4.25 bits a value)   | 9.5         | 56.7          |
| experts dequantized, fp32 / bf16          | 71.2 / 35.6 | 427.2 / 213.6 |
| rest, fp32 / bf16                         | 6.7 / 3.4   | 8.1 / 4.0     |
| whole model in fp32: packed / dequantized | 16.2 / 77.9 | 64.8 / 435.2  |
| whole model in bf16: packed / dequantized | 12.8 / 39.0 | 60.8 / 217.6  |

Kept packed, an expert runs through ``linear_mxfp4``. On CPU in float32, inputs of up to KERNEL_MAX_ROWS
rows (an expert's share of a decode step, or of a short prefill) go through a C++ kernel that decodes each
32-value block in registers and dots it with up to eight tokens at once (models/csrc/mxfp4_linear.cpp): no
dequantized weight is written anywhere, so an expert run (gate_up 5760x2880 + down 2880x2880) at one token
costs 2.1 ms on one thread instead of 46 through tiles. Otherwise the matrices are dequantized ROWS_PER_TILE
rows at a time (5.6 MiB in fp32) and multiplied by torch, so a forward never holds a whole dequantized
expert (95 MiB).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from models.cpu_kernels import cpu_kernels_loaded

VALUES_PER_BLOCK = 32
BYTES_PER_BLOCK = 16
SCALE_BIAS = 127
# Rows of a weight dequantized per tile in linear_mxfp4: 512 x 2880 fp32 = 5.6 MiB stays in the 32 MiB L3
# between being written and being multiplied. Measured per expert run (gate_up + down, 2880 wide, one
# thread): 256 and 512 rows equal, 2048 rows 10-20% slower, the whole matrix 2x slower at 1-16 tokens and
# 1.3x at 256 (bench/NOTES.md, MoE section).
ROWS_PER_TILE = 512
# Inputs of at most this many rows take the C++ kernel: it costs ~1.05 ms a token per expert run on one
# thread (its FMAs), the tiles ~45 ms (their dequantization) plus ~0.65 ms a token (MKL's GEMM). Expert run
# at 2880 wide, ms, best of 7 (kernel) / 5 (tiles): one thread, 64 / 96 / 128 tokens: kernel 67 / 101 / 137,
# tiles 86 / 109 / 133; two threads: kernel 35 / 51 / 78, tiles 51 / 60 / 71.
KERNEL_MAX_ROWS = 96

# The 16 E2M1 codes: sign bit, two exponent bits, one mantissa bit.
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
_FP4 = torch.tensor(FP4_VALUES, dtype=torch.float32)
# Byte b -> (value of its low nibble, value of its high nibble), float32 [256, 2].
BYTE_VALUES = torch.stack((_FP4.repeat(16), _FP4.repeat_interleave(16)), dim=-1)


def packed_shapes(shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The (blocks, scales) shapes that store a tensor of ``shape`` (its last dimension a multiple of 32)."""
    *prefix, n = shape
    groups = n // VALUES_PER_BLOCK
    return (*prefix, groups, BYTES_PER_BLOCK), (*prefix, groups)


def dequantize_mxfp4(blocks: Tensor, scales: Tensor, dtype: torch.dtype) -> Tensor:
    """blocks [..., G, 16] and scales [..., G] (uint8) -> values [..., G * 32] in ``dtype``.

    One lookup per byte in a 256-entry (low, high) table and one in-place multiply by each group's power of
    two: a few passes over the output, where a 16-entry table indexed per nibble needs int64 codes and a stack.
    """
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != BYTES_PER_BLOCK:
        raise ValueError(f"MXFP4 blocks {list(blocks.shape)} do not match scales {list(scales.shape)}")
    table = BYTE_VALUES.to(blocks.device)
    values = table.index_select(0, blocks.flatten().int()).view(*scales.shape, VALUES_PER_BLOCK)
    values.mul_(torch.exp2(scales.float() - SCALE_BIAS).unsqueeze(-1))
    return values.flatten(-2).to(dtype)


def kernel_takes(x: Tensor, rows: int) -> bool:
    """Whether the C++ kernel multiplies ``rows`` rows like x (float32 on CPU, up to KERNEL_MAX_ROWS)."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and rows <= KERNEL_MAX_ROWS and cpu_kernels_loaded()


def linear_mxfp4(x: Tensor, blocks: Tensor, scales: Tensor, bias: Tensor | None) -> Tensor:
    """``F.linear(x, W, bias)`` for W [O, I] stored as blocks [O, I/32, 16] and scales [O, I/32].

    Few float32 rows on CPU: the C++ kernel, which never writes W out. Otherwise W is dequantized
    ROWS_PER_TILE rows at a time and each tile multiplied while still in cache: the packed bytes are read
    once and no full float copy of W is written or read back.
    """
    rows = x.reshape(-1, x.shape[-1])
    if kernel_takes(x, len(rows)):
        out = torch.ops.gptserve.mxfp4_linear(rows.contiguous(), blocks.contiguous(), scales.contiguous(), bias)
        return out.view(*x.shape[:-1], blocks.shape[0])
    out = x.new_empty(*x.shape[:-1], blocks.shape[0])
    for start in range(0, blocks.shape[0], ROWS_PER_TILE):
        tile = slice(start, start + ROWS_PER_TILE)
        weight = dequantize_mxfp4(blocks[tile], scales[tile], x.dtype)
        out[..., tile] = F.linear(x, weight, None if bias is None else bias[tile])
    return out
