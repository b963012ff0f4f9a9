"""The MXFP4 weight decoded group by group under the vdpbf16ps dots (models/csrc/mxfp4_dot_linear.cpp), a bf16
model's path for a prompt's expert rows: the same bits as bf16_dot_linear on the dequantized weight. Skipped,
with the reason, on CPUs without AVX512-BF16."""

import pytest
import torch
import torch.nn.functional as F

import models.mxfp4
from models.bf16_weight_linear import pack_bf16_weight
from models.mxfp4 import BF16_KERNEL_MAX_ROWS, dequantize_mxfp4, dequantize_mxfp4_torch, linear_mxfp4
from tests.bf16_dots import assert_rounded_product, kernels, needs_avx512_bf16  # noqa: F401 (the kernels fixture applies itself)

pytestmark = needs_avx512_bf16


def op(x, blocks, scales, bias=None):
    return torch.ops.gptserve.mxfp4_dot_linear(x, blocks, scales, bias)


def random_weight(out_features: int, in_features: int, seed: int, scale_range=(118, 130)):
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (out_features, in_features // 32, 16), generator=g, dtype=torch.uint8)
    scales = torch.randint(*scale_range, (out_features, in_features // 32), generator=g, dtype=torch.uint8)
    return blocks, scales, g


def test_every_byte_and_scale_decodes_exactly():
    """One-hot rows read the weight back: every byte under every scale from 0 to 252 (6 x 2^125, the largest
    finite). Scales 0 and 1 take the float decode, the rest the exponent add; vdpbf16ps takes subnormal
    inputs as zero (as bf16_dot_linear and oneDNN's bf16 kernels do), so the values under 2^-126 that scales 0
    and 1 give read back as zero. 1,024 rows are eleven of the kernel's 96-row blocks over each decoded group."""
    blocks = torch.arange(256, dtype=torch.uint8).repeat(253, 2).view(253, 32, 16)  # 1024 values a row
    scales = torch.arange(253, dtype=torch.uint8).view(253, 1).expand(253, 32).contiguous()
    got = op(torch.eye(1024, dtype=torch.bfloat16), blocks, scales)
    weight = dequantize_mxfp4(blocks, scales, torch.bfloat16)
    subnormal = (weight != 0) & (weight.abs() < torch.finfo(torch.bfloat16).tiny)
    assert subnormal[0].any() and not subnormal[2:].any()
    assert torch.equal(got.T, torch.where(subnormal, 0, weight))


@pytest.mark.parametrize("rows,out_features,in_features", [(1, 37, 32), (9, 64, 96), (13, 70, 2880), (97, 33, 160),
                                                           (200, 96, 64)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_equals_the_dots_on_the_dequantized_weight(rows, out_features, in_features, with_bias):
    """Bit for bit, at widths that fill whole groups of 32 outputs and widths that leave a group part empty,
    with every scale (253-255 decode to inf and NaN, as the dequantizer gives them); and the result is x times
    the weight summed in float32 and rounded once."""
    blocks, scales, g = random_weight(out_features, in_features, seed=rows, scale_range=(0, 256))
    x = torch.randn(rows, in_features, generator=g).bfloat16()
    bias = torch.randn(out_features, generator=g) if with_bias else None
    weight = dequantize_mxfp4(blocks, scales, torch.bfloat16)
    expected = torch.ops.gptserve.bf16_dot_linear(x, pack_bf16_weight(weight), bias, out_features)
    assert torch.equal(op(x, blocks, scales, bias).view(torch.int16), expected.view(torch.int16))
    blocks, scales, _ = random_weight(out_features, in_features, seed=rows)  # finite weights
    assert_rounded_product(op(x, blocks, scales, bias), x, dequantize_mxfp4(blocks, scales, torch.float32), bias)


def test_refuses_inputs_it_cannot_read():
    blocks, scales, _ = random_weight(8, 64, seed=0)
    x = torch.randn(5, 64).bfloat16()
    with pytest.raises(RuntimeError, match=r"x: contiguous bfloat16 \[M,K\]"):
        op(x.float(), blocks, scales)
    with pytest.raises(RuntimeError, match=r"x: \[M, K\] with K = 32 \* blocks.size\(1\)"):
        op(x[:, :32].contiguous(), blocks, scales)
    with pytest.raises(RuntimeError, match=r"blocks: contiguous uint8 \[N, K/32, 16\]"):
        op(x, blocks.view(8, 32), scales)
    with pytest.raises(RuntimeError, match=r"scales: contiguous uint8 \[N, K/32\] matching blocks"):
        op(x, blocks, scales[:4])
    with pytest.raises(RuntimeError, match=r"bias: float32 \[N\]"):
        op(x, blocks, scales, torch.zeros(8, dtype=torch.bfloat16))


def test_without_the_built_kernels_a_prompt_takes_torch_ops(monkeypatch):
    """Where the C++ kernels failed to build, a bf16 prompt's product is torch's on the weight torch dequantized."""
    monkeypatch.setattr(models.mxfp4, "cpu_kernels_loaded", lambda: False)

    def unbuilt(*args):
        raise AssertionError("the C++ kernel was called")

    monkeypatch.setattr(torch.ops.gptserve, "mxfp4_dot_linear", unbuilt)
    blocks, scales, g = random_weight(40, 64, seed=3)
    x = torch.randn(BF16_KERNEL_MAX_ROWS + 1, 64, generator=g).bfloat16()
    bias = torch.randn(40, generator=g).bfloat16()
    expected = F.linear(x, dequantize_mxfp4_torch(blocks, scales, torch.bfloat16), bias)
    assert torch.equal(linear_mxfp4(x, blocks, scales, bias), expected)
