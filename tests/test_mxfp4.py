"""MXFP4 dequantization against a decode written from the format's definition, bit by bit."""

import pytest
import torch

from models.mxfp4 import FP4_VALUES, dequantize_mxfp4, packed_shapes


def e2m1(code: int) -> float:
    """One FP4 value from its bits: sign, 2 exponent bits (bias 1), 1 mantissa bit; exponent 0 is subnormal."""
    sign = -1.0 if code & 0b1000 else 1.0
    exponent, mantissa = (code >> 1) & 0b11, code & 0b1
    magnitude = mantissa * 0.5 if exponent == 0 else 2.0 ** (exponent - 1) * (1 + mantissa / 2)
    return sign * magnitude


def plain_decode(blocks: torch.Tensor, scales: torch.Tensor) -> list[list[float]]:
    """Rows of blocks [R, G, 16] / scales [R, G] decoded with Python numbers only, low nibble first."""
    rows = []
    for row_blocks, row_scales in zip(blocks.tolist(), scales.tolist()):
        row = []
        for block, scale in zip(row_blocks, row_scales):
            for byte in block:
                row += [e2m1(byte & 0xF) * 2.0 ** (scale - 127), e2m1(byte >> 4) * 2.0 ** (scale - 127)]
        rows.append(row)
    return rows


def test_dequantize_matches_plain_python_decode():
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (6, 3, 16), generator=g, dtype=torch.uint8)
    scales = torch.randint(110, 140, (6, 3), generator=g, dtype=torch.uint8)
    values = dequantize_mxfp4(blocks, scales, torch.float32)
    assert values.shape == (6, 96)
    assert values.tolist() == plain_decode(blocks, scales)


def test_low_nibble_is_the_first_value():
    blocks = torch.zeros(1, 16, dtype=torch.uint8)
    blocks[0, 0] = 0x2F  # low nibble 0xF = -6.0, high nibble 0x2 = +1.0
    scales = torch.tensor([128], dtype=torch.uint8)  # x2
    values = dequantize_mxfp4(blocks, scales, torch.float32)
    assert values[:3].tolist() == [-12.0, 2.0, 0.0]


def test_dequantize_is_exact_in_bfloat16():
    g = torch.Generator().manual_seed(1)
    blocks = torch.randint(0, 256, (4, 2, 2, 16), generator=g, dtype=torch.uint8)
    scales = torch.randint(100, 150, (4, 2, 2), generator=g, dtype=torch.uint8)
    as_float = dequantize_mxfp4(blocks, scales, torch.float32)
    assert torch.equal(dequantize_mxfp4(blocks, scales, torch.bfloat16).float(), as_float)


def nibble_table_decode(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The previous implementation: int64 nibble codes into a 16-entry table, times 2^(scale - 127)."""
    table = torch.tensor(FP4_VALUES, dtype=torch.float32)
    codes = torch.stack((blocks & 0x0F, blocks >> 4), dim=-1).flatten(-2).long()
    powers = torch.exp2(scales.float() - 127).unsqueeze(-1)
    return (table[codes] * powers).flatten(-2)


def test_large_tensor_is_bit_identical_to_the_nibble_table_decode():
    """Every byte and every scale, 255 (inf, so NaN for zero codes) included; compared as bit patterns."""
    g = torch.Generator().manual_seed(2)
    blocks = torch.randint(0, 256, (2, 300, 90, 16), generator=g, dtype=torch.uint8)
    scales = torch.randint(0, 256, (2, 300, 90), generator=g, dtype=torch.uint8)
    expected = nibble_table_decode(blocks, scales)
    assert torch.equal(dequantize_mxfp4(blocks, scales, torch.float32).view(torch.int32), expected.view(torch.int32))


def test_packed_shapes_group_the_last_dimension_by_32():
    assert packed_shapes((32, 5760, 2880)) == ((32, 5760, 90, 16), (32, 5760, 90))


def test_mismatched_blocks_and_scales_are_rejected():
    with pytest.raises(ValueError, match="do not match"):
        dequantize_mxfp4(torch.zeros(2, 3, 16, dtype=torch.uint8), torch.zeros(2, 4, dtype=torch.uint8), torch.float32)
