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

Kept packed, an expert runs through ``linear_mxfp4``. On CPU, inputs of few rows (an expert's share of a
decode step) go through a C++ kernel that decodes each 32-value block in registers and dots it with up to
eight tokens at once (models/csrc/mxfp4_linear.cpp): no dequantized weight is written anywhere, so an expert
run (gate_up 5760x2880 + down 2880x2880) at one token costs ~1 ms on one thread. bf16 rows on a CPU with
AVX512-BF16 take its bf16 form (models/csrc/mxfp4_bf16_linear.cpp: codes looked up as bf16, bf16 dot
products), 1.1-1.6x the float32 kernel's speed at one token (a MoE layer's grouped call 1.32x) and 1.3-1.6x
at two to four (two threads, bench/NOTES.md session 13). Inputs of more rows (a
prefill's) have the matrix dequantized (models/csrc/mxfp4_dequantize.cpp, ~2.5 ms an expert) into a reused
buffer and multiplied by a GEMM: in fp32 ROWS_PER_TILE rows at a time, in bf16 whole, so a forward never
holds a second dequantized expert. Except bf16 rows on a CPU with AVX512-BF16 and no AMX: there the vdpbf16ps
dots decode the weight 32 outputs at a time into a tile that stays in cache and multiply every row with it
(models/csrc/mxfp4_dot_linear.cpp), where oneDNN's bf16 GEMM ran at ~3/4 of their rate at an expert's ~64
prompt rows and the dequantized expert went through memory (a 512-token prefill of the gpt-oss-20b widths
1.2-1.6x faster, bench/NOTES.md session 24).
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import Tensor

from models.cpu_isa import cpu_isa
from models.cpu_kernels import cpu_kernels_loaded

VALUES_PER_BLOCK = 32
BYTES_PER_BLOCK = 16
SCALE_BIAS = 127
# Rows of a weight dequantized per tile in linear_mxfp4 (fp32): 512 x 2880 fp32 = 5.6 MiB stays in the 32 MiB
# L3 between being written and being multiplied. Measured per expert run (gate_up + down, 2880 wide, one
# thread): 256 and 512 rows equal, 2048 rows 10-20% slower, the whole matrix 2x slower at 1-16 tokens and
# 1.3x at 256 (bench/NOTES.md, MoE section).
ROWS_PER_TILE = 512
# fp32 inputs of at most this many rows take the C++ kernel: ~1 ms a token per expert run on one thread (its
# FMAs), the tiles ~4.5 ms (their dequantization, models/csrc/mxfp4_dequantize.cpp) plus ~0.5 ms a token.
# One thread, ms, best of 5 (`python -m bench.mxfp4_bf16_expert --dtype float32`), 8 / 16 / 32 / 64 tokens:
# kernel 7.8 / 15.3 / 30.8 / 61.4, tiles 9.4 / 13.3 / 21.0 / 37.1. Yet 16 here made a P=512 prefill of the
# 20b-widths model 4x slower at two threads on the loaded machine (bench/NOTES.md, "bf16 prefill experts"):
# tiles open ~22 parallel regions an expert where the grouped kernel opens one a layer. So 96 stays.
KERNEL_MAX_ROWS = 96
# bf16 inputs (a ``--dtype bfloat16`` model) of at most this many rows take the kernel (its bf16 form on
# AVX512-BF16: at 8 rows only 1.05-1.14x the widened rows', bench/NOTES.md session 13); more go through the
# dots on the weight decoded group by group (AVX512-BF16 without AMX), or else one bf16 GEMM (bf16 products,
# fp32 sums where the CPU has AMX) on the whole matrix dequantized to bf16. The kernel against that GEMM,
# one thread, ms, best of 5 (`python -m bench.mxfp4_bf16_expert`),
# 4 / 8 / 16 / 32 / 64 / 128 tokens: kernel 4.3 / 12.6 / 26.9 / 62.5 / 122 / 196, GEMM 7.7 / 12.7 / 16.0 /
# 26.1 / 30.8 / 55.6 (dequantizing both matrices: 2.4).
BF16_KERNEL_MAX_ROWS = 8

# The 16 E2M1 codes: sign bit, two exponent bits, one mantissa bit.
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
_FP4 = torch.tensor(FP4_VALUES, dtype=torch.float32)
# Byte b -> (value of its low nibble, value of its high nibble), float32 [256, 2].
BYTE_VALUES = torch.stack((_FP4.repeat(16), _FP4.repeat_interleave(16)), dim=-1)
_SCRATCH = threading.local()  # ``dequantized``'s buffers, one per dtype


def packed_shapes(shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The (blocks, scales) shapes that store a tensor of ``shape`` (its last dimension a multiple of 32)."""
    *prefix, n = shape
    groups = n // VALUES_PER_BLOCK
    return (*prefix, groups, BYTES_PER_BLOCK), (*prefix, groups)


def dequantize_mxfp4(blocks: Tensor, scales: Tensor, dtype: torch.dtype) -> Tensor:
    """blocks [..., G, 16] and scales [..., G] (uint8) -> values [..., G * 32] in ``dtype``.

    On CPU, into float32 or bfloat16, one pass of the C++ decoder (models/csrc/mxfp4_dequantize.cpp): ~10x
    faster than the torch ops, with the same bits. Elsewhere those ops (``dequantize_mxfp4_torch``).
    """
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != BYTES_PER_BLOCK:
        raise ValueError(f"MXFP4 blocks {list(blocks.shape)} do not match scales {list(scales.shape)}")
    if blocks.device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) and cpu_kernels_loaded():
        return torch.ops.gptserve.mxfp4_dequantize(blocks.contiguous(), scales.contiguous(), dtype)
    return dequantize_mxfp4_torch(blocks, scales, dtype)


def dequantize_mxfp4_torch(blocks: Tensor, scales: Tensor, dtype: torch.dtype) -> Tensor:
    """``dequantize_mxfp4`` through torch ops, on any device and into any float dtype.

    One lookup per byte in a 256-entry (low, high) table and one in-place multiply by each group's power of
    two: a few passes over the output, where a 16-entry table indexed per nibble needs int64 codes and a stack.
    """
    table = BYTE_VALUES.to(blocks.device)
    values = table.index_select(0, blocks.flatten().int()).view(*scales.shape, VALUES_PER_BLOCK)
    values.mul_(torch.exp2(scales.float() - SCALE_BIAS).unsqueeze(-1))
    return values.flatten(-2).to(dtype)


def kernel_max_rows(dtype: torch.dtype) -> int:
    """Up to how many rows of ``dtype`` the C++ kernel takes (bf16 rows widened to fp32); -1: none."""
    return {torch.float32: KERNEL_MAX_ROWS, torch.bfloat16: BF16_KERNEL_MAX_ROWS}.get(dtype, -1)


def kernel_takes(x: Tensor, rows: int) -> bool:
    """Whether the C++ kernel multiplies ``rows`` rows like x (float32 or bfloat16 on CPU, few enough rows)."""
    return x.device.type == "cpu" and rows <= kernel_max_rows(x.dtype) and cpu_kernels_loaded()


def takes_bf16_dots(x: Tensor) -> bool:
    """Whether the kernel's bf16 form multiplies x's rows as they are (bf16 on a CPU with AVX512-BF16)."""
    return x.dtype == torch.bfloat16 and x.device.type == "cpu" and cpu_isa().avx512_bf16


def grouped_kernel(x: Tensor, counts: list[int], blocks: Tensor, scales: Tensor, float_bias: Tensor | None) -> Tensor:
    """The C++ kernel on x's rows grouped by expert (counts[e] rows for blocks[e], scales[e]; ``float_bias``
    [E, O] in fp32): bf16 rows through bf16 dot products where the CPU has them, else widened to fp32 and the
    result rounded back to x's dtype."""
    counts_tensor = torch.tensor(counts, dtype=torch.int64)
    if takes_bf16_dots(x):
        return torch.ops.gptserve.mxfp4_grouped_linear_bf16(x.contiguous(), counts_tensor, blocks.contiguous(),
                                                            scales.contiguous(), float_bias)
    out = torch.ops.gptserve.mxfp4_grouped_linear(x.float().contiguous(), counts_tensor, blocks.contiguous(),
                                                  scales.contiguous(), float_bias)
    return out.to(x.dtype)


def widened(bias: Tensor | None) -> Tensor | None:
    """The bias as the fp32 kernel reads it (a bf16 model's biases are bf16)."""
    return None if bias is None else bias.float()


def dequantized(blocks: Tensor, scales: Tensor, dtype: torch.dtype) -> Tensor:
    """W dequantized for one product that follows at once. On CPU it is written into this thread's reused
    buffer, which the next call overwrites: a fresh tensor a call costs more in page faults (the OS zeroing
    33 MB of new pages for a bf16 gate_up) than the decode itself (~1.5 ms on one thread)."""
    if not (blocks.device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) and cpu_kernels_loaded()):
        return dequantize_mxfp4(blocks, scales, dtype)
    numel = scales.numel() * VALUES_PER_BLOCK
    buffers: dict[torch.dtype, Tensor] = _SCRATCH.__dict__.setdefault("buffers", {})
    if dtype not in buffers or buffers[dtype].numel() < numel:
        with torch.inference_mode(False):  # a normal tensor: written in and out of inference mode
            buffers[dtype] = torch.empty(numel, dtype=dtype)
    weight = buffers[dtype][:numel].view(*scales.shape[:-1], -1)
    torch.ops.gptserve.mxfp4_dequantize_into(blocks.contiguous(), scales.contiguous(), weight)
    return weight


def linear_mxfp4(x: Tensor, blocks: Tensor, scales: Tensor, bias: Tensor | None) -> Tensor:
    """``F.linear(x, W, bias)`` for W [O, I] stored as blocks [O, I/32, 16] and scales [O, I/32].

    Few rows on CPU: the C++ kernel, which never writes W out (bf16 rows in its bf16 form where the CPU has
    AVX512-BF16, else widened to fp32 for it and the result rounded back). More bf16 rows on a CPU with
    AVX512-BF16 and no AMX: the dots on W decoded a group of outputs at a time, in cache. Otherwise W is
    dequantized and multiplied by torch: ROWS_PER_TILE rows at a time, or, bf16 on CPU, whole, so that one GEMM
    reads it (two-thread runs: tiles of 512 and 1440 rows were slower).
    """
    rows = x.reshape(-1, x.shape[-1])
    if kernel_takes(x, len(rows)):
        float_bias = None if bias is None else bias.float().unsqueeze(0)
        out = grouped_kernel(rows, [len(rows)], blocks.unsqueeze(0), scales.unsqueeze(0), float_bias)
        return out.view(*x.shape[:-1], blocks.shape[0])
    if takes_bf16_dots(x) and not cpu_isa().amx_bf16 and cpu_kernels_loaded():  # dots on W decoded group by group
        out = torch.ops.gptserve.mxfp4_dot_linear(rows.contiguous(), blocks.contiguous(), scales.contiguous(),
                                                  widened(bias))
        return out.view(*x.shape[:-1], blocks.shape[0])
    if x.dtype == torch.bfloat16 and x.device.type == "cpu":  # other devices keep the measured tiles
        return F.linear(x, dequantized(blocks, scales, x.dtype), bias)
    out = x.new_empty(*x.shape[:-1], blocks.shape[0])
    for start in range(0, blocks.shape[0], ROWS_PER_TILE):
        tile = slice(start, start + ROWS_PER_TILE)
        weight = dequantized(blocks[tile], scales[tile], x.dtype)
        out[..., tile] = F.linear(x, weight, None if bias is None else bias[tile])
    return out
