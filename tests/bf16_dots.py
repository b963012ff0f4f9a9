"""What the tests of the AVX512-BF16 kernels share: the skip where the CPU lacks them, the built kernels, and
the check that a result is the float64 product summed in float32 and rounded to bf16 once."""

from __future__ import annotations

import pytest
import torch

from models.cpu_isa import cpu_isa
from models.cpu_kernels import cpu_kernels_loaded

needs_avx512_bf16 = pytest.mark.skipif(not cpu_isa().avx512_bf16, reason=f"this CPU has no AVX512-BF16 ({cpu_isa()})")

HALF_BF16_STEP = 2.0**-8  # the most a rounding to bf16 (8 significant bits) moves a value, relative to it


@pytest.fixture(scope="module", autouse=True)
def kernels():
    if not cpu_kernels_loaded():
        pytest.fail("the C++ CPU kernels did not build (g++ and ninja are test requirements)")


def assert_rounded_product(got: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """got is x @ weight.T + bias summed in float32 and rounded to bf16 once: within half a bf16 step of the
    exact value, plus the float32 sum's own error (a few float32 steps of the sum of the terms' magnitudes)."""
    exact = x.double() @ weight.double().T + (0 if bias is None else bias.double())
    bound = x.double().abs() @ weight.double().abs().T
    assert got.dtype == torch.bfloat16 and got.shape == exact.shape
    assert ((got.double() - exact).abs() <= HALF_BF16_STEP * exact.abs() + 1e-6 * bound).all()
