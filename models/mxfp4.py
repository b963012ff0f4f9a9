"""MXFP4, the format GPT-OSS ships its expert weights in: 4-bit E2M1 values sharing one power-of-two scale per 32.

A tensor of logical shape [..., N] is stored as ``blocks`` uint8 [..., N/32, 16] (two values per byte, low
nibble first) and ``scales`` uint8 [..., N/32] (an E8M0 exponent with bias 127). Every MXFP4 value times a
power of two is exact in float32 and bfloat16, so dequantizing loses nothing there.

Memory for the weights of the real models (experts: 3 * hidden * intermediate values per expert; "rest":
embedding, unembedding, attention, router, norms, biases; GiB = 2^30 bytes):

| model        | experts packed | experts fp32 | experts bf16 | rest fp32 | rest bf16 | packed + fp32 rest | packed + bf16 rest |
|--------------|----------------|--------------|--------------|-----------|-----------|--------------------|--------------------|
| gpt-oss-20b  | 9.5            | 71.2         | 35.6         | 6.7       | 3.4       | 16.2               | 12.8               |
| gpt-oss-120b | 56.7           | 427.2        | 213.6        | 8.1       | 4.0       | 64.8               | 60.8               |

(20b: 24 layers x 32 experts, 120b: 36 layers x 128 experts, hidden = intermediate = 2880.) Kept packed,
a forward also holds the experts it is running dequantized: 95 MiB per expert in fp32, 47 MiB in bf16.
"""

from __future__ import annotations

import torch
from torch import Tensor

VALUES_PER_BLOCK = 32
BYTES_PER_BLOCK = 16
SCALE_BIAS = 127

# The 16 E2M1 codes: sign bit, two exponent bits, one mantissa bit.
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def packed_shapes(shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The (blocks, scales) shapes that store a tensor of ``shape`` (its last dimension a multiple of 32)."""
    *prefix, n = shape
    groups = n // VALUES_PER_BLOCK
    return (*prefix, groups, BYTES_PER_BLOCK), (*prefix, groups)


def dequantize_mxfp4(blocks: Tensor, scales: Tensor, dtype: torch.dtype) -> Tensor:
    """blocks [..., G, 16] and scales [..., G] (uint8) -> values [..., G * 32] in ``dtype``."""
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != BYTES_PER_BLOCK:
        raise ValueError(f"MXFP4 blocks {list(blocks.shape)} do not match scales {list(scales.shape)}")
    table = torch.tensor(FP4_VALUES, dtype=torch.float32, device=blocks.device)
    codes = torch.stack((blocks & 0x0F, blocks >> 4), dim=-1).flatten(-2).long()
    powers = torch.exp2(scales.float() - SCALE_BIAS).unsqueeze(-1)
    return (table[codes] * powers).flatten(-2).to(dtype)
