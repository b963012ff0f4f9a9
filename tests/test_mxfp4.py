"""MXFP4 dequantization against a decode written from the format's definition, bit by bit, and the C++ kernel
(models/csrc/mxfp4_linear.cpp) that multiplies packed weights without dequantizing them first."""

import pytest
import torch
import torch.nn.functional as F

from models.cpu_kernels import cpu_kernels_loaded
from models.mxfp4 import FP4_VALUES, KERNEL_MAX_ROWS, dequantize_mxfp4, linear_mxfp4, packed_shapes


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


def random_packed(out_features: int, in_features: int, seed: int, scale_range=(118, 130)):
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (out_features, in_features // 32, 16), generator=g, dtype=torch.uint8)
    scales = torch.randint(*scale_range, (out_features, in_features // 32), generator=g, dtype=torch.uint8)
    return blocks, scales, g


@pytest.fixture(scope="module")
def kernels():
    if not cpu_kernels_loaded():
        pytest.fail("the C++ CPU kernels did not build (g++ and ninja are test requirements)")


@pytest.mark.parametrize("vectorized", [True, False], ids=["avx2", "portable"])
def test_kernel_decodes_every_byte_and_scale_exactly(kernels, vectorized):
    """One-hot inputs read the decoded weights back: every byte value under every scale from 0 (subnormal) to
    252 (above it 6 x 2^(s-127) overflows, and 0 x inf poisons the one-hot sums)."""
    blocks = torch.arange(256, dtype=torch.uint8).repeat(253, 2).view(253, 32, 16)  # 1024 values a row
    scales = torch.arange(253, dtype=torch.uint8).view(253, 1).expand(253, 32).contiguous()
    eye = torch.eye(1024)
    got = torch.cat([torch.ops.gptserve.mxfp4_linear(eye[i : i + 16], blocks, scales, None, vectorized)
                     for i in range(0, 1024, 16)])
    assert torch.equal(got.T, dequantize_mxfp4(blocks, scales, torch.float32))


@pytest.mark.parametrize("vectorized", [True, False], ids=["avx2", "portable"])
@pytest.mark.parametrize("rows,out_features,in_features", [(1, 37, 32), (3, 40, 64), (5, 72, 96), (9, 16, 2880),
                                                           (17, 8, 320), (32, 33, 64)])
def test_kernel_matches_the_float_product(kernels, vectorized, rows, out_features, in_features):
    blocks, scales, g = random_packed(out_features, in_features, seed=rows)
    weight = dequantize_mxfp4(blocks, scales, torch.float64)
    x, bias = torch.randn(rows, in_features, generator=g), torch.randn(out_features, generator=g)
    for b in (bias, None):
        got = torch.ops.gptserve.mxfp4_linear(x, blocks, scales, b, vectorized)
        expected = x.double() @ weight.T + (0 if b is None else b.double())
        bound = x.double().abs() @ weight.abs().T  # the fp32 rounding of the sums scales with this
        assert ((got.double() - expected).abs() <= 1e-6 * bound + 1e-6).all()


def test_kernel_result_does_not_depend_on_the_thread_count(kernels):
    blocks, scales, g = random_packed(200, 256, seed=4)
    x = torch.randn(6, 256, generator=g)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.gptserve.mxfp4_linear(x, blocks, scales, None)
        torch.set_num_threads(2)
        two = torch.ops.gptserve.mxfp4_linear(x, blocks, scales, None)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def test_kernel_refuses_inputs_it_cannot_read(kernels):
    blocks, scales, _ = random_packed(8, 64, seed=5)
    op = torch.ops.gptserve.mxfp4_linear
    with pytest.raises(RuntimeError, match="contiguous float32"):
        op(torch.randn(64, 2).T, blocks, scales, None)
    with pytest.raises(RuntimeError, match="contiguous float32"):
        op(torch.randn(2, 64, dtype=torch.float64), blocks, scales, None)
    with pytest.raises(RuntimeError, match=r"blocks: contiguous uint8 \[O, I/32, 16\] for this x"):
        op(torch.randn(2, 96), blocks, scales, None)
    with pytest.raises(RuntimeError, match="scales"):
        op(torch.randn(2, 64), blocks, scales[:, :1], None)
    with pytest.raises(RuntimeError, match="bias"):
        op(torch.randn(2, 64), blocks, scales, torch.zeros(7))


def test_linear_mxfp4_takes_the_kernel_for_few_rows_and_tiles_for_many(kernels):
    blocks, scales, g = random_packed(600, 128, seed=6)  # more rows of W than a tile: two tiles
    bias = torch.randn(600, generator=g)
    weight = dequantize_mxfp4(blocks, scales, torch.float32)
    few = torch.randn(2, KERNEL_MAX_ROWS // 2, 128, generator=g)
    many = torch.randn(KERNEL_MAX_ROWS + 1, 128, generator=g)
    assert torch.equal(linear_mxfp4(few, blocks, scales, bias),
                       torch.ops.gptserve.mxfp4_linear(few.view(-1, 128), blocks, scales, bias).view(2, -1, 600))
    assert torch.equal(linear_mxfp4(many, blocks, scales, bias), F.linear(many, weight, bias))
    close = dict(rtol=1e-5, atol=1e-3)  # outputs of ~100: fp32 sums in another order
    torch.testing.assert_close(linear_mxfp4(few, blocks, scales, bias), F.linear(few, weight, bias), **close)


def test_one_or_two_tokens_give_the_rows_of_a_larger_batch_exactly(kernels):
    """One and two tokens decode straight into the FMAs; more go through a row buffer: the same sums."""
    blocks, scales, g = random_packed(50, 2880, seed=7)
    x = torch.randn(5, 2880, generator=g)
    op = torch.ops.gptserve.mxfp4_linear
    batch = op(x, blocks, scales, None)
    assert torch.equal(op(x[:1], blocks, scales, None), batch[:1])
    assert torch.equal(op(x[1:3].contiguous(), blocks, scales, None), batch[1:3])
