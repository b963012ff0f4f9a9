"""MXFP4 dequantization against a decode written from the format's definition, bit by bit, and the C++ kernel
(models/csrc/mxfp4_linear.cpp) that multiplies packed weights without dequantizing them first."""

import pytest
import torch
import torch.nn.functional as F

from models.cpu_isa import cpu_isa
from models.cpu_kernels import cpu_kernels_loaded
from models.mxfp4 import (
    BF16_KERNEL_MAX_ROWS,
    FP4_VALUES,
    KERNEL_MAX_ROWS,
    dequantize_mxfp4,
    dequantize_mxfp4_torch,
    dequantized,
    linear_mxfp4,
    packed_shapes,
)


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


# Every path the kernel has; each test runs those this CPU can (a CPU without AVX-512 skips that one).
ISAS = ["avx512", "avx2", "portable"]


@pytest.fixture
def isa(request, kernels):
    try:
        torch.ops.gptserve.mxfp4_linear(torch.zeros(1, 32), torch.zeros(1, 1, 16, dtype=torch.uint8),
                                        torch.zeros(1, 1, dtype=torch.uint8), None, request.param)
    except RuntimeError as error:
        pytest.skip(str(error))
    return request.param


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_gives_every_byte_under_every_scale_bit_for_bit(kernels, isa, dtype):
    """The C++ decoder against the torch decode for each byte under each scale 0-255, as bit patterns (NaN
    where that is NaN: zero codes times the scale 255's inf). On AVX512-BW, bf16 takes a word lookup with the
    scale added to the exponent for scales 2-252 and the float decode for the rest."""
    blocks = torch.arange(256, dtype=torch.uint8).repeat(256, 1).view(256, 16, 16)
    scales = torch.arange(256, dtype=torch.uint8).view(256, 1).expand(256, 16).contiguous()
    got = torch.ops.gptserve.mxfp4_dequantize(blocks, scales, dtype, isa)
    expected = nibble_table_decode(blocks, scales).to(dtype)
    nan = expected.isnan()
    assert nan.any() and torch.equal(got.isnan(), nan)
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    assert torch.equal(got[~nan].view(bits), expected[~nan].view(bits))


@pytest.mark.parametrize("isa", ISAS, indirect=True)
def test_kernel_decodes_every_byte_and_scale_exactly(kernels, isa):
    """One-hot inputs read the decoded weights back: every byte value under every scale from 0 (subnormal) to
    252 (above it 6 x 2^(s-127) overflows, and 0 x inf poisons the one-hot sums)."""
    blocks = torch.arange(256, dtype=torch.uint8).repeat(253, 2).view(253, 32, 16)  # 1024 values a row
    scales = torch.arange(253, dtype=torch.uint8).view(253, 1).expand(253, 32).contiguous()
    eye = torch.eye(1024)
    got = torch.cat([torch.ops.gptserve.mxfp4_linear(eye[i : i + 16], blocks, scales, None, isa)
                     for i in range(0, 1024, 16)])
    assert torch.equal(got.T, dequantize_mxfp4(blocks, scales, torch.float32))


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("rows,out_features,in_features", [(1, 37, 32), (2, 7, 32), (3, 40, 64), (5, 72, 96),
                                                           (8, 41, 64), (9, 16, 2880), (16, 9, 128), (17, 8, 320),
                                                           (32, 33, 64)])
def test_kernel_matches_the_float_product(kernels, isa, rows, out_features, in_features):
    blocks, scales, g = random_packed(out_features, in_features, seed=rows)
    weight = dequantize_mxfp4(blocks, scales, torch.float64)
    x, bias = torch.randn(rows, in_features, generator=g), torch.randn(out_features, generator=g)
    for b in (bias, None):
        got = torch.ops.gptserve.mxfp4_linear(x, blocks, scales, b, isa)
        expected = x.double() @ weight.T + (0 if b is None else b.double())
        bound = x.double().abs() @ weight.abs().T  # the fp32 rounding of the sums scales with this
        assert ((got.double() - expected).abs() <= 1e-6 * bound + 1e-6).all()


@pytest.mark.parametrize("isa", ISAS, indirect=True)
def test_kernel_result_does_not_depend_on_the_thread_count(kernels, isa):
    blocks, scales, g = random_packed(200, 256, seed=4)
    x = torch.randn(19, 256, generator=g)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.gptserve.mxfp4_linear(x, blocks, scales, None, isa)
        torch.set_num_threads(2)
        two = torch.ops.gptserve.mxfp4_linear(x, blocks, scales, None, isa)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def test_kernel_refuses_inputs_it_cannot_read(kernels):
    blocks, scales, _ = random_packed(8, 64, seed=5)
    op = torch.ops.gptserve.mxfp4_linear
    x = torch.randn(2, 64)
    with pytest.raises(RuntimeError, match="contiguous float32"):
        op(torch.randn(64, 2).T, blocks, scales, None)
    with pytest.raises(RuntimeError, match="contiguous float32"):
        op(torch.randn(2, 64, dtype=torch.float64), blocks, scales, None)
    with pytest.raises(RuntimeError, match=r"blocks: contiguous uint8 \[O, I/32, 16\] for this x"):
        op(torch.randn(2, 96), blocks, scales, None)
    with pytest.raises(RuntimeError, match=r"blocks: contiguous uint8"):
        op(x, blocks.transpose(0, 1).contiguous().transpose(0, 1), scales, None)
    with pytest.raises(RuntimeError, match=r"blocks: contiguous uint8"):
        op(x, blocks.view(torch.int8), scales, None)
    with pytest.raises(RuntimeError, match="scales"):
        op(x, blocks, scales[:, :1], None)
    with pytest.raises(RuntimeError, match="scales: contiguous uint8"):
        op(x, blocks, scales.T.contiguous().T, None)
    with pytest.raises(RuntimeError, match="scales: contiguous uint8"):
        op(x, blocks, scales.int(), None)
    with pytest.raises(RuntimeError, match="bias"):
        op(x, blocks, scales, torch.zeros(7))
    with pytest.raises(RuntimeError, match=r"bias: float32 \[O\]"):
        op(x, blocks, scales, torch.zeros(8, dtype=torch.float64))


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


@pytest.mark.parametrize("isa", ISAS, indirect=True)
def test_a_token_gets_the_same_result_whatever_else_is_in_the_batch(kernels, isa):
    """Every token runs the same operations in the same order, alone or in any slot of a pass of up to 8."""
    blocks, scales, g = random_packed(50, 2880, seed=7)
    x = torch.randn(19, 2880, generator=g)
    op = torch.ops.gptserve.mxfp4_linear
    batch = op(x, blocks, scales, None, isa)
    alone = torch.cat([op(x[i : i + 1], blocks, scales, None, isa) for i in range(len(x))])
    assert torch.equal(alone, batch)
    assert torch.equal(op(x[5:14].contiguous(), blocks, scales, None, isa), batch[5:14])


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("tokens", range(1, 9))
def test_a_weight_row_gives_the_same_result_alone_or_decoded_beside_others(kernels, isa, tokens):
    """AVX-512 decodes two or four rows at once (the number depends on the tokens): a row's sums must not
    depend on that, nor on whether it falls in such a group or in the rows left over."""
    blocks, scales, g = random_packed(11, 352, seed=12)  # 11 blocks a row: two full lines and a partial one
    x = torch.randn(tokens, 352, generator=g)
    op = torch.ops.gptserve.mxfp4_linear
    together = op(x, blocks, scales, None, isa)
    alone = torch.cat([op(x, blocks[o : o + 1], scales[o : o + 1], None, isa) for o in range(11)], dim=1)
    assert torch.equal(alone, together)


@pytest.mark.parametrize("isa", ISAS, indirect=True)
def test_kernel_over_the_whole_scale_range(kernels, isa):
    """Scales from 0 (a subnormal power of two) to 150, the edges of the exponent bias among them."""
    blocks, _, g = random_packed(45, 512, seed=8)
    edges = torch.tensor([0, 1, 2, 126, 127, 128], dtype=torch.uint8)
    scales = torch.cat([edges, torch.randint(100, 151, (45 * 16 - len(edges),), generator=g, dtype=torch.uint8)])
    scales = scales[torch.randperm(len(scales), generator=g)].view(45, 16)
    weight = dequantize_mxfp4(blocks, scales, torch.float64)
    x = torch.randn(11, 512, generator=g)
    got = torch.ops.gptserve.mxfp4_linear(x, blocks, scales, None, isa).double()
    bound = x.double().abs() @ weight.abs().T
    assert ((got - x.double() @ weight.T).abs() <= 1e-6 * bound + 1e-30).all()


@pytest.mark.parametrize("isa", ISAS, indirect=True)
def test_blocks_that_overflow_when_dequantized_give_the_same_inf_and_nan(kernels, isa):
    """From scale 253 on, 4 x 2^(s-127) overflows float32 (255 is inf itself): the product must carry the
    same inf (of the same sign) or NaN as the dequantized weights do, not a finite sum."""
    scales = torch.full((6, 2), 127, dtype=torch.uint8)
    blocks = torch.full((6, 2, 16), 0x21, dtype=torch.uint8)  # 0.5 and 1.0: finite at every scale but 255
    scales[:, 1] = torch.tensor([254, 255, 255, 253, 254, 252], dtype=torch.uint8)
    blocks[0, 1] = 0x77  # 6 x 2^127 = +inf
    blocks[1, 1] = 0x12  # 1.0 x inf and 0.5 x inf: +inf
    blocks[2, 1, 3] = 0x02  # a zero code times inf: NaN
    blocks[3, 1] = 0x22  # 1.0 x 2^126: finite
    blocks[4, 1, :8], blocks[4, 1, 8:] = 0x77, 0xFF  # +inf and -inf in one block: NaN
    blocks[5, 1] = 0x77  # 6 x 2^125: the largest finite value
    x = (torch.rand(3, 64) + 0.5) / 1024  # small enough that the finite rows' float32 sums stay finite
    expected = x.double() @ dequantize_mxfp4(blocks, scales, torch.float32).double().T
    got = torch.ops.gptserve.mxfp4_linear(x, blocks, scales, None, isa)
    assert torch.equal(got[:, 0], torch.full((3,), float("inf"))) and torch.equal(got[:, 1], got[:, 0])
    assert got[:, 2].isnan().all() and got[:, 4].isnan().all()
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=0, equal_nan=True)


@pytest.mark.parametrize("isa", ["avx512", "avx2"], indirect=True)
def test_vector_paths_agree_with_the_portable_one(kernels, isa):
    """The same decode and scale folding; the FMAs' single rounding and (AVX-512) the lanes summed differ."""
    blocks, scales, g = random_packed(70, 2880, seed=9)
    x, bias = torch.randn(10, 2880, generator=g), torch.randn(70, generator=g)
    op = torch.ops.gptserve.mxfp4_linear
    torch.testing.assert_close(op(x, blocks, scales, bias, "portable"), op(x, blocks, scales, bias, isa),
                               rtol=1e-5, atol=1e-4)


def test_best_is_the_widest_path_this_cpu_runs(kernels):
    blocks, scales, g = random_packed(33, 320, seed=11)
    x = torch.randn(3, 320, generator=g)
    op = torch.ops.gptserve.mxfp4_linear
    for isa in ISAS:
        try:
            widest = op(x, blocks, scales, None, isa)
            break
        except RuntimeError:
            continue
    assert torch.equal(op(x, blocks, scales, None), widest)
    with pytest.raises(RuntimeError, match="isa: best, avx512, avx2 or portable"):
        op(x, blocks, scales, None, "sse")


def test_linear_mxfp4_reads_weights_that_are_not_contiguous(kernels):
    """An expert's slice of [E, O, I/32, 16] parameters is contiguous; other views are copied first."""
    blocks, scales, g = random_packed(24, 96, seed=10)
    blocks_t, scales_t = blocks.transpose(0, 1).contiguous().transpose(0, 1), scales.T.contiguous().T
    x = torch.randn(3, 96, generator=g)
    assert not blocks_t.is_contiguous() and not scales_t.is_contiguous()
    assert torch.equal(linear_mxfp4(x, blocks_t, scales_t, None), linear_mxfp4(x, blocks, scales, None))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("isa", ISAS, indirect=True)
def test_cpp_dequantizer_gives_the_torch_decode_bit_for_bit(kernels, isa, dtype):
    """Every byte at every scale (0: subnormal powers of two; 253-255: inf and, for zero codes, NaN). NaN may
    carry other payload bits than torch's conversion writes; it stays NaN in the same places."""
    g = torch.Generator().manual_seed(3)
    blocks = torch.randint(0, 256, (3, 256, 8, 16), generator=g, dtype=torch.uint8)
    scales = torch.arange(256, dtype=torch.uint8).view(1, 256, 1).expand(3, 256, 8).contiguous()
    got = torch.ops.gptserve.mxfp4_dequantize(blocks, scales, dtype, isa)
    expected = dequantize_mxfp4_torch(blocks, scales, dtype)
    assert got.dtype == dtype and got.shape == (3, 256, 256)
    assert torch.equal(got.isnan(), expected.isnan()) and got.isnan().any()
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    assert torch.equal(got[~got.isnan()].view(bits), expected[~expected.isnan()].view(bits))


def test_dequantized_reuses_one_buffer_and_stays_exact_across_sizes(kernels):
    small, large = random_packed(8, 64, seed=11)[:2], random_packed(40, 96, seed=12)[:2]
    for blocks, scales in (small, large, small):
        weight = dequantized(blocks, scales, torch.bfloat16)
        assert torch.equal(weight, dequantize_mxfp4_torch(blocks, scales, torch.bfloat16))
    assert dequantized(*small, torch.bfloat16).data_ptr() == dequantized(*large, torch.bfloat16).data_ptr()


def test_bf16_rows_take_the_widened_kernel_when_few_and_a_bf16_gemm_when_many(kernels):
    """Few bf16 rows: the fp32 kernel on the rows widened, rounded back once (on a CPU with AVX512-BF16 the
    kernel's bf16 form, tests/test_mxfp4_bf16_kernel.py: the same sums in another order, so within a bf16
    step). Many: one bf16 GEMM (fp32 sums) on the exact bf16 weights, as torch computes it."""
    blocks, scales, g = random_packed(600, 128, seed=13)
    bias = torch.randn(600, generator=g).bfloat16()
    few = torch.randn(BF16_KERNEL_MAX_ROWS, 128, generator=g).bfloat16()
    many = torch.randn(BF16_KERNEL_MAX_ROWS + 1, 128, generator=g).bfloat16()
    widened = torch.ops.gptserve.mxfp4_linear(few.float(), blocks, scales, bias.float()).bfloat16()
    got = linear_mxfp4(few, blocks, scales, bias)
    assert got.dtype == torch.bfloat16
    if cpu_isa().avx512_bf16:
        torch.testing.assert_close(got, widened, rtol=2**-8, atol=1e-2)
    else:
        assert torch.equal(got, widened)
    weight = dequantize_mxfp4_torch(blocks, scales, torch.bfloat16)
    assert torch.equal(linear_mxfp4(many, blocks, scales, bias), F.linear(many, weight, bias))
    exact = many.double() @ weight.double().T + bias.double()
    torch.testing.assert_close(linear_mxfp4(many, blocks, scales, bias).double(), exact, rtol=1e-2, atol=0.5)


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("counts", [[3, 0, 9, 1, 17], [0, 0, 4, 0, 0], [0, 0, 0, 0, 0]], ids=["mixed", "one", "none"])
def test_grouped_kernel_equals_each_expert_on_its_own_rows(kernels, isa, counts):
    g = torch.Generator().manual_seed(sum(counts))
    experts = [random_packed(40, 96, seed=e) for e in range(len(counts))]
    blocks, scales = torch.stack([b for b, _, _ in experts]), torch.stack([s for _, s, _ in experts])
    bias, x = torch.randn(len(counts), 40, generator=g), torch.randn(sum(counts), 96, generator=g)
    got = torch.ops.gptserve.mxfp4_grouped_linear(x, torch.tensor(counts), blocks, scales, bias, isa)
    starts = [sum(counts[:e]) for e in range(len(counts))]
    expected = [torch.ops.gptserve.mxfp4_linear(x[s : s + n].contiguous(), blocks[e], scales[e], bias[e], isa)
                for e, (s, n) in enumerate(zip(starts, counts))]
    assert torch.equal(got, torch.cat(expected))
    no_bias = torch.ops.gptserve.mxfp4_grouped_linear(x, torch.tensor(counts), blocks, scales, None, isa)
    assert torch.equal(no_bias + bias.repeat_interleave(torch.tensor(counts), dim=0), got)


def test_grouped_kernel_refuses_inputs_it_cannot_read(kernels):
    blocks = torch.zeros(3, 8, 2, 16, dtype=torch.uint8)
    scales = torch.full((3, 8, 2), 127, dtype=torch.uint8)
    x, counts = torch.randn(5, 64), torch.tensor([2, 0, 3])
    op = torch.ops.gptserve.mxfp4_grouped_linear
    with pytest.raises(RuntimeError, match=r"blocks: contiguous uint8 \[E, O, I/32, 16\] for this x"):
        op(x, counts, blocks[0], scales, None)
    with pytest.raises(RuntimeError, match=r"scales: contiguous uint8 \[E, O, I/32\] matching blocks"):
        op(x, counts, blocks, scales[:2], None)
    with pytest.raises(RuntimeError, match=r"counts: contiguous int64 \[E\]"):
        op(x, counts.int(), blocks, scales, None)
    with pytest.raises(RuntimeError, match=r"counts: contiguous int64 \[E\]"):
        op(x, counts[:2], blocks, scales, None)
    for wrong in ([2, 0, 2], [2, 0, 4], [6, -1, 0]):
        with pytest.raises(RuntimeError, match="counts: non-negative, summing to x's rows"):
            op(x, torch.tensor(wrong), blocks, scales, None)
    with pytest.raises(RuntimeError, match=r"bias: float32 \[E, O\]"):
        op(x, counts, blocks, scales, torch.zeros(8))
