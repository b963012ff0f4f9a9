"""The MXFP4 kernel's bf16 form (models/csrc/mxfp4_bf16_linear.cpp): E2M1 codes looked up as bf16 and dotted
with bf16 tokens by AVX512-BF16, checked against the dequantized weight in float64. Skipped, with the reason,
on CPUs without AVX512-BF16, where bf16 tokens take the float32 kernel widened (tests/test_mxfp4.py)."""

import pytest
import torch
import torch.nn.functional as F

from models.bf16_weight_linear import pack_bf16_weight
from models.cpu_isa import cpu_isa
from models.moe import grouped_linear_mxfp4
from models.mxfp4 import BF16_KERNEL_MAX_ROWS, dequantize_mxfp4, linear_mxfp4
from tests.bf16_dots import HALF_BF16_STEP, assert_rounded_product, kernels, needs_avx512_bf16  # noqa: F401 (the kernels fixture applies itself)

pytestmark = needs_avx512_bf16


def op(x, counts, blocks, scales, bias=None):
    return torch.ops.gptserve.mxfp4_grouped_linear_bf16(x, torch.tensor(counts), blocks, scales, bias)


def random_packed(experts: int, out_features: int, in_features: int, seed: int, scale_range=(118, 130)):
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (experts, out_features, in_features // 32, 16), generator=g, dtype=torch.uint8)
    scales = torch.randint(*scale_range, (experts, out_features, in_features // 32), generator=g, dtype=torch.uint8)
    return blocks, scales, g


def test_every_byte_and_scale_decodes_exactly():
    """One-hot tokens read the weights back: every byte under every scale from 0 (a subnormal power of two,
    which takes the value-by-value path) to 252 (6 x 2^125, the largest finite)."""
    blocks = torch.arange(256, dtype=torch.uint8).repeat(253, 2).view(1, 253, 32, 16)  # 1024 values a row
    scales = torch.arange(253, dtype=torch.uint8).view(1, 253, 1).expand(1, 253, 32).contiguous()
    eye = torch.eye(1024, dtype=torch.bfloat16)
    got = torch.cat([op(eye[i : i + 8], [8], blocks, scales) for i in range(0, 1024, 8)])
    assert torch.equal(got.T, dequantize_mxfp4(blocks[0], scales[0], torch.bfloat16))


@pytest.mark.parametrize("rows,out_features,in_features", [(1, 37, 32), (2, 7, 64), (3, 40, 96), (4, 19, 128),
                                                           (5, 72, 352), (8, 41, 2880), (9, 16, 160), (17, 8, 640)])
def test_matches_the_float64_product_rounded_once(rows, out_features, in_features):
    """Widths that fill whole 128-value lines and widths that end in a line of one to three blocks; up to 8
    tokens a pass and more."""
    blocks, scales, g = random_packed(1, out_features, in_features, seed=rows)
    x = (torch.randn(rows, in_features, generator=g) * 4).bfloat16()
    bias = torch.randn(1, out_features, generator=g)
    got = op(x, [rows], blocks, scales, bias)
    assert_rounded_product(got, x, dequantize_mxfp4(blocks[0], scales[0], torch.float64), bias[0])


def test_a_result_does_not_depend_on_the_batch_the_rows_beside_it_or_the_threads():
    blocks, scales, g = random_packed(1, 50, 2880, seed=7)
    x = torch.randn(19, 2880, generator=g).bfloat16()
    batch = op(x, [19], blocks, scales)
    assert torch.equal(torch.cat([op(x[i : i + 1], [1], blocks, scales) for i in range(19)]), batch)
    assert torch.equal(op(x[5:14].contiguous(), [9], blocks, scales), batch[5:14])
    by_row = [op(x, [19], blocks[:, o : o + 1], scales[:, o : o + 1]) for o in range(50)]
    assert torch.equal(torch.cat(by_row, dim=1), batch)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(op(x, [19], blocks, scales), batch)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("counts", [[3, 0, 9, 1, 17], [0, 0, 4, 0, 0], [0, 0, 0, 0, 0]], ids=["mixed", "one", "none"])
def test_grouped_rows_equal_each_expert_on_its_own_rows(counts):
    blocks, scales, g = random_packed(len(counts), 40, 96, seed=sum(counts))
    bias, x = torch.randn(len(counts), 40, generator=g), torch.randn(sum(counts), 96, generator=g).bfloat16()
    got = op(x, counts, blocks, scales, bias)
    starts = [sum(counts[:e]) for e in range(len(counts))]
    expected = [op(x[s : s + n].contiguous(), [n], blocks[e : e + 1], scales[e : e + 1], bias[e : e + 1])
                for e, (s, n) in enumerate(zip(starts, counts))]
    assert got.shape == (sum(counts), 40) and torch.equal(got, torch.cat(expected))


def test_scales_at_the_ends_of_the_range_give_the_dequantized_weights_inf_and_nan():
    """Where a block's values leave float32's normal range once scaled (scale 0, or 253 and up), the row is
    computed value by value, so the result is the dequantized weight's: its inf, NaN and subnormals too."""
    scales = torch.full((1, 7, 5), 127, dtype=torch.uint8)
    blocks = torch.full((1, 7, 5, 16), 0x21, dtype=torch.uint8)  # 0.5 and 1.0: finite at every scale but 255
    scales[0, :, 4] = torch.tensor([254, 255, 255, 253, 254, 252, 0], dtype=torch.uint8)  # in a partial line
    blocks[0, 0, 4] = 0x77  # 6 x 2^127 = +inf
    blocks[0, 1, 4] = 0x12  # 1.0 x inf and 0.5 x inf: +inf
    blocks[0, 2, 4, 3] = 0x02  # a zero code times inf: NaN
    blocks[0, 3, 4] = 0x22  # 1.0 x 2^126: finite
    blocks[0, 4, 4, :8], blocks[0, 4, 4, 8:] = 0x77, 0xFF  # +inf and -inf in one block: NaN
    blocks[0, 5, 4] = 0x77  # 6 x 2^125: the largest finite value
    x = ((torch.rand(3, 160) + 0.5) / 1024).bfloat16()  # small enough that the finite rows' sums stay finite
    weight = dequantize_mxfp4(blocks[0], scales[0], torch.float32)
    got = op(x, [3], blocks, scales)
    assert torch.equal(got[:, 0], torch.full((3,), float("inf"), dtype=torch.bfloat16))
    assert torch.equal(got[:, 1], got[:, 0]) and got[:, 2].isnan().all() and got[:, 4].isnan().all()
    expected = (x.double() @ weight.double().T).bfloat16()
    torch.testing.assert_close(got, expected, rtol=HALF_BF16_STEP, atol=0, equal_nan=True)


def test_refuses_inputs_it_cannot_read():
    blocks = torch.zeros(3, 8, 2, 16, dtype=torch.uint8)
    scales = torch.full((3, 8, 2), 127, dtype=torch.uint8)
    x, counts = torch.randn(5, 64).bfloat16(), [2, 0, 3]
    with pytest.raises(RuntimeError, match=r"x: contiguous bfloat16 \[N,I\]"):
        op(x.float(), counts, blocks, scales)
    with pytest.raises(RuntimeError, match=r"blocks: contiguous uint8 \[E, O, I/32, 16\] for this x"):
        op(x[:, :32].contiguous(), counts, blocks, scales)
    with pytest.raises(RuntimeError, match=r"scales: contiguous uint8 \[E, O, I/32\] matching blocks"):
        op(x, counts, blocks, scales[:2])
    for wrong in ([2, 0, 2], [6, -1, 0]):
        with pytest.raises(RuntimeError, match="counts: non-negative, summing to x's rows"):
            op(x, wrong, blocks, scales)
    with pytest.raises(RuntimeError, match=r"bias: float32 \[E, O\]"):
        op(x, counts, blocks, scales, torch.zeros(3, 8, dtype=torch.bfloat16))


def test_the_models_bf16_rows_take_it_when_few():
    """linear_mxfp4 and a MoE layer's grouped call, on few bf16 rows, give this kernel's result; more rows
    than BF16_KERNEL_MAX_ROWS take the vdpbf16ps dots on the weight decoded a group at a time (oneDNN's GEMM on
    the dequantized weight where the CPU has AMX)."""
    blocks, scales, g = random_packed(2, 600, 128, seed=13)
    bias = torch.randn(2, 600, generator=g).bfloat16()
    few = torch.randn(BF16_KERNEL_MAX_ROWS, 128, generator=g).bfloat16()
    assert torch.equal(linear_mxfp4(few, blocks[0], scales[0], bias[0]), op(few, [len(few)], blocks[:1], scales[:1],
                                                                           bias[:1].float()))
    counts = [3, BF16_KERNEL_MAX_ROWS - 3]
    assert torch.equal(grouped_linear_mxfp4(few, counts, blocks, scales, bias), op(few, counts, blocks, scales,
                                                                                    bias.float()))
    many = torch.randn(BF16_KERNEL_MAX_ROWS + 1, 128, generator=g).bfloat16()
    weight = dequantize_mxfp4(blocks[0], scales[0], torch.bfloat16)
    expected = (F.linear(many, weight, bias[0]) if cpu_isa().amx_bf16 else
                torch.ops.gptserve.bf16_dot_linear(many, pack_bf16_weight(weight), bias[0].float(), 600))
    assert torch.equal(linear_mxfp4(many, blocks[0], scales[0], bias[0]), expected)
