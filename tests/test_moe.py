"""Packed MXFP4 experts (run a tile of rows at a time) against the float experts they dequantize to, and
expert-parallel ranks against the whole MoE layer."""

import pytest
import torch
import torch.nn.functional as F

from models.moe import MoE, grouped_linear, swiglu, top_k_experts
from models.mxfp4 import ROWS_PER_TILE, dequantize_mxfp4, linear_mxfp4
from models.parallel import TensorParallel

# Neither dimension a multiple of the tile: full tiles and a partial last one in both matrices.
HIDDEN, INTERMEDIATE = 2 * ROWS_PER_TILE + 64, ROWS_PER_TILE + 128


def random_packed(rows: int, cols: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    blocks = torch.randint(0, 256, (rows, cols // 32, 16), generator=g, dtype=torch.uint8)
    return blocks, torch.randint(119, 124, (rows, cols // 32), generator=g, dtype=torch.uint8)


@pytest.mark.parametrize("tokens", [1, 7, 64])
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_mxfp4_equals_linear_on_the_dequantized_matrix(tokens, with_bias):
    g = torch.Generator().manual_seed(tokens)
    blocks, scales = random_packed(HIDDEN, INTERMEDIATE, g)
    x = torch.randn(tokens, INTERMEDIATE, generator=g)
    bias = torch.randn(HIDDEN, generator=g) if with_bias else None
    expected = F.linear(x, dequantize_mxfp4(blocks, scales, torch.float32), bias)
    torch.testing.assert_close(linear_mxfp4(x, blocks, scales, bias), expected, rtol=1e-5, atol=1e-5 * expected.std())


def random_moe(packed: bool, g: torch.Generator, num_experts: int = 6) -> MoE:
    moe = MoE(HIDDEN, INTERMEDIATE, num_experts, 2, alpha=1.702, limit=7.0, packed=packed).requires_grad_(False)
    for name, param in moe.named_parameters():
        if name.endswith("_scales"):
            param.random_(119, 124, generator=g)
        elif name.endswith("_blocks"):
            param.random_(0, 256, generator=g)
        else:
            param.normal_(0.0, 0.02, generator=g)
    return moe


# 40 tokens: every expert's share (~13) in one grouped kernel call (bf16: over the kernel's 8 rows, so its
# bf16 GEMM, as 400); 400 (~133 an expert): each expert's whole MLP on its own, through dequantized weights.
# Float experts go through torch's grouped GEMM either way.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [8, 40, 400])
def test_packed_moe_equals_the_float_moe_it_dequantizes_to(tokens, dtype):
    g = torch.Generator().manual_seed(0)
    packed = random_moe(packed=True, g=g)
    unpacked = MoE(HIDDEN, INTERMEDIATE, 6, 2, alpha=1.702, limit=7.0, packed=False).requires_grad_(False)
    experts = packed.experts
    unpacked.router.load_state_dict(packed.router.state_dict())
    unpacked.experts.gate_up_bias.copy_(experts.gate_up_bias)
    unpacked.experts.down_bias.copy_(experts.down_bias)
    unpacked.experts.gate_up.copy_(dequantize_mxfp4(experts.gate_up_blocks, experts.gate_up_scales, torch.float32))
    unpacked.experts.down.copy_(dequantize_mxfp4(experts.down_blocks, experts.down_scales, torch.float32))
    x = torch.randn(tokens, HIDDEN, generator=g)
    expected = unpacked(x)
    if dtype == torch.float32:
        torch.testing.assert_close(packed(x), expected, rtol=1e-5, atol=1e-5 * expected.std())
        return
    # bf16: as close to the fp32 result as the float MoE in bf16 gets (both round their products' outputs)
    x = x.bfloat16()
    packed_error = (packed.to(dtype)(x).float() - expected).abs()
    float_error = (unpacked.to(dtype)(x).float() - expected).abs()
    assert packed_error.max() <= 1.5 * float_error.max() and packed_error.mean() <= 1.5 * float_error.mean()


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("counts", [[0, 5, 1, 0, 9, 0], [0, 5] + [0] * 8 + [9]], ids=["grouped", "sparse"])
def test_grouped_linear_equals_a_linear_per_expert(with_bias, counts):
    g = torch.Generator().manual_seed(2)
    experts = len(counts)
    weight, x = torch.randn(experts, 24, 32, generator=g), torch.randn(sum(counts), 32, generator=g)
    bias = torch.randn(experts, 24, generator=g) if with_bias else None
    starts = [sum(counts[:e]) for e in range(len(counts))]
    expected = torch.cat([F.linear(x[s : s + n], weight[e], None if bias is None else bias[e])
                          for e, (s, n) in enumerate(zip(starts, counts))])
    torch.testing.assert_close(grouped_linear(x, counts, weight, bias), expected)


def test_a_moe_layer_equals_running_each_token_through_its_experts():
    """The grouped runs against the plain definition: per token, its top-k experts' outputs, softmax-weighted."""
    g = torch.Generator().manual_seed(3)
    moe = MoE(64, 96, 8, 3, alpha=1.702, limit=7.0, packed=False).requires_grad_(False)
    for param in moe.parameters():
        param.normal_(0.0, 0.1, generator=g)
    x, e = torch.randn(10, 64, generator=g), moe.experts
    expected = torch.zeros_like(x)
    for t in range(len(x)):
        logits, picks = moe.router(x[t]).topk(3)
        for weight, expert in zip(torch.softmax(logits, -1), picks.tolist()):
            h = swiglu(F.linear(x[t], e.gate_up[expert], e.gate_up_bias[expert]), 1.702, 7.0)
            expected[t] += weight * F.linear(h, e.down[expert], e.down_bias[expert])
    torch.testing.assert_close(moe(x), expected)


def test_equal_router_logits_go_to_the_lower_expert_and_nan_first():
    """bf16 router logits tie often; the pick must not depend on torch.topk's implementation (which picks experts
    1, 7, 5 and 3 from the first row on torch 2.13), since the fused decode layer picks by the same rule."""
    logits = torch.tensor([[1, 2, 2, 2, 0, 2, 1, 2], [0, 0, 0, 0, 0, 0, 0, 0], [1, float("nan"), 3, 3, 0, 0, 0, 0]],
                          dtype=torch.bfloat16)
    values, experts = top_k_experts(logits, 4)
    assert experts.tolist() == [[1, 2, 3, 5], [0, 1, 2, 3], [1, 2, 3, 0]]
    assert values[0].tolist() == [2, 2, 2, 2] and values[2, 1:].tolist() == [3, 3, 1]


class UnreducedRank(TensorParallel):
    """One rank of an expert-parallel pair, its partial output returned as is (the test sums the ranks)."""

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_expert_parallel_ranks_sum_to_the_whole_layer():
    g = torch.Generator().manual_seed(1)
    whole = MoE(64, 96, 8, 3, alpha=1.702, limit=7.0, packed=False).requires_grad_(False)
    for param in whole.parameters():
        param.normal_(0.0, 0.1, generator=g)
    ranks = [MoE(64, 96, 8, 3, 1.702, 7.0, packed=False, tp=UnreducedRank(r, 2)).requires_grad_(False) for r in (0, 1)]
    for rank in ranks:
        assert len(rank.expert_range) == 4
        rank.router.load_state_dict(whole.router.state_dict())
        for name, param in rank.experts.named_parameters():
            param.copy_(getattr(whole.experts, name)[rank.expert_range.start : rank.expert_range.stop])
    x = torch.randn(10, 64, generator=g)
    torch.testing.assert_close(ranks[0](x) + ranks[1](x), whole(x))


# 1 token on 16 experts leaves most groups empty; 40 tokens fill them all
@pytest.mark.parametrize("packed", [False, True], ids=["float", "packed"])
@pytest.mark.parametrize("tokens", [1, 40])
def test_static_shape_routing_gives_the_host_sized_groups_output(packed, tokens):
    g = torch.Generator().manual_seed(4)
    moe = random_moe(packed, g, num_experts=16)
    x = torch.randn(tokens, HIDDEN, generator=g)
    expected = moe(x)
    moe.static_shapes = True
    torch.testing.assert_close(moe(x), expected, rtol=1e-5, atol=1e-5 * expected.std())


def test_static_shape_expert_parallel_ranks_sum_to_the_whole_layer():
    """Each rank runs every pick, another rank's as zero-weighted rows: the sum is still the whole layer."""
    g = torch.Generator().manual_seed(5)
    whole = random_moe(False, g, num_experts=8)
    ranks = [MoE(HIDDEN, INTERMEDIATE, 8, 2, 1.702, 7.0, packed=False, tp=UnreducedRank(r, 2)).requires_grad_(False)
             for r in (0, 1)]
    for rank in ranks:
        rank.static_shapes = True
        rank.router.load_state_dict(whole.router.state_dict())
        for name, param in rank.experts.named_parameters():
            param.copy_(getattr(whole.experts, name)[rank.expert_range.start : rank.expert_range.stop])
    x = torch.randn(10, HIDDEN, generator=g)
    expected = whole(x)
    torch.testing.assert_close(ranks[0](x) + ranks[1](x), expected, rtol=1e-5, atol=1e-5 * expected.std())
