"""The bf16 model's linear kernel (models/csrc/bf16_dot_linear.cpp): bf16 rows times the packed bf16 weight,
dotted in pairs by AVX512-BF16, checked against the float64 product. Skipped, with the reason, on CPUs
without AVX512-BF16, where a bf16 model's layers stay oneDNN's (tests/test_cpu_bf16_compute.py)."""

import pytest
import torch

from models.bf16_dot_linear import Bf16DotLinear
from models.bf16_weight_linear import pack_bf16_weight
from tests.bf16_dots import assert_rounded_product, kernels, needs_avx512_bf16  # noqa: F401 (the kernels fixture applies itself)

pytestmark = needs_avx512_bf16


def op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return torch.ops.gptserve.bf16_dot_linear(x, pack_bf16_weight(weight), bias, weight.shape[0])


def random_case(rows: int, out_features: int, in_features: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, in_features, generator=g) * 4).bfloat16()
    weight = torch.randn(out_features, in_features, generator=g).bfloat16()
    bias = torch.randn(out_features, generator=g)
    return x, weight, bias


@pytest.mark.parametrize("rows,out_features,in_features", [
    (1, 32, 2), (1, 37, 33), (2, 7, 64), (4, 64, 768), (12, 40, 96), (13, 72, 351),
    (96, 33, 130), (97, 20, 64), (250, 70, 257)])
def test_matches_the_float64_product_rounded_once(rows, out_features, in_features):
    """Whole and partial groups of 32 outputs, even and odd inputs, passes of 1 to 12 rows, and several
    96-row blocks with a short last one."""
    x, weight, bias = random_case(rows, out_features, in_features, seed=rows)
    assert_rounded_product(op(x, weight, bias), x, weight, bias)
    assert_rounded_product(op(x, weight), x, weight, None)


def test_one_hot_rows_read_every_weight_back_exactly():
    weight = torch.randn(45, 67).bfloat16()
    assert torch.equal(op(torch.eye(67, dtype=torch.bfloat16), weight), weight.T)


def test_a_result_does_not_depend_on_the_batch_the_rows_beside_it_or_the_threads():
    x, weight, bias = random_case(200, 50, 2880, seed=7)
    batch = op(x, weight, bias)
    assert torch.equal(torch.cat([op(x[i : i + 1], weight, bias) for i in range(0, 200, 17)]), batch[::17])
    assert torch.equal(op(x[5:14].contiguous(), weight, bias), batch[5:14])
    assert torch.equal(op(x[:, :], weight[13:29], bias[13:29]), batch[:, 13:29])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(op(x, weight, bias), batch)
    finally:
        torch.set_num_threads(threads)


def test_inf_and_nan_propagate_as_in_the_product():
    weight = torch.ones(3, 4).bfloat16()
    x = torch.tensor([[1.0, float("inf"), 0.0, 2.0], [1.0, float("nan"), 0.0, 2.0], [1.0, 1.0, 1.0, 1.0]]).bfloat16()
    got = op(x, weight)
    assert torch.isposinf(got[0]).all() and torch.isnan(got[1]).all()
    assert torch.equal(got[2], torch.full((3,), 4.0).bfloat16())


def test_no_rows_give_an_empty_result():
    assert op(torch.empty(0, 8, dtype=torch.bfloat16), torch.ones(5, 8).bfloat16()).shape == (0, 5)


@pytest.mark.parametrize("make", [
    lambda w: (torch.ones(2, 8), pack_bf16_weight(w), None),  # float32 rows
    lambda w: (torch.ones(2, 16).bfloat16()[:, ::2], pack_bf16_weight(w), None),  # not contiguous
    lambda w: (torch.ones(2, 10).bfloat16(), pack_bf16_weight(w), None),  # packed for another width
    lambda w: (torch.ones(2, 8).bfloat16(), pack_bf16_weight(w), torch.ones(5).bfloat16()),  # bf16 bias
    lambda w: (torch.ones(2, 8).bfloat16(), pack_bf16_weight(w), torch.ones(4)),  # bias of another length
])
def test_refuses_inputs_it_cannot_read(make):
    x, packed, bias = make(torch.ones(5, 8))
    with pytest.raises(RuntimeError):
        torch.ops.gptserve.bf16_dot_linear(x, packed, bias, 5)


def test_the_layer_keeps_leading_dimensions_and_holds_only_the_packed_weight():
    x, weight, bias = random_case(6, 40, 48, seed=3)
    layer = Bf16DotLinear(weight, bias.bfloat16())
    assert {name for name, _ in layer.named_buffers()} == {"packed", "bias"} and layer.bias.dtype == torch.float32
    got = layer(x.view(2, 3, 48))
    assert got.shape == (2, 3, 40)
    assert torch.equal(got.view(6, 40), op(x, weight, bias.bfloat16().float()))
