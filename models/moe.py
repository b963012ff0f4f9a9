"""GPT-OSS's mixture-of-experts MLP: a router picks k experts per token, each a clamped-SwiGLU MLP.

Tokens are grouped by expert and every selected expert runs once, on its own tokens, so the cost grows
with experts_per_token and never with the number of experts. Expert matrices are stored [out, in] as the
original checkpoint holds them, either as float tensors or as MXFP4 blocks dequantized only when run, a tile
of rows at a time (models.mxfp4.linear_mxfp4).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.mxfp4 import linear_mxfp4, packed_shapes
from models.parallel import SINGLE, TensorParallel


def splits_by_experts(num_experts: int, tp: TensorParallel) -> bool:
    """Expert parallel (each rank holds num_experts / N whole experts) when N divides the experts; otherwise
    every rank holds a 1/N slice of every expert's intermediate dimension, as openai/gpt-oss's reference does."""
    return num_experts % tp.world_size == 0


def swiglu(x: Tensor, alpha: float, limit: float) -> Tensor:
    """Gate and linear halves interleave (gate at even columns); both are clamped, and the linear half gets +1."""
    gate, linear = x[..., ::2], x[..., 1::2]
    gate = gate.clamp(max=limit)
    linear = linear.clamp(min=-limit, max=limit)
    return gate * torch.sigmoid(gate * alpha) * (linear + 1)


def _frozen(shape: tuple[int, ...], dtype: torch.dtype | None = None) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)


class Experts(nn.Module):
    """The num_experts MLPs of one layer: gate_up [E, 2I, H] (interleaved gate/linear rows), down [E, H, I]."""

    def __init__(
        self,
        num_experts: int,
        hidden: int,
        intermediate: int,
        alpha: float,
        limit: float,
        packed: bool,
        adds_down_bias: bool = True,
    ) -> None:
        super().__init__()
        self.alpha, self.limit, self.packed = alpha, limit, packed
        self.adds_down_bias = adds_down_bias  # False on all ranks but one when the intermediate dim is split
        gate_up_shape, down_shape = (num_experts, 2 * intermediate, hidden), (num_experts, hidden, intermediate)
        if packed:
            gate_up_blocks, gate_up_scales = packed_shapes(gate_up_shape)
            down_blocks, down_scales = packed_shapes(down_shape)
            self.gate_up_blocks = _frozen(gate_up_blocks, torch.uint8)
            self.gate_up_scales = _frozen(gate_up_scales, torch.uint8)
            self.down_blocks = _frozen(down_blocks, torch.uint8)
            self.down_scales = _frozen(down_scales, torch.uint8)
        else:
            self.gate_up = _frozen(gate_up_shape)
            self.down = _frozen(down_shape)
        self.gate_up_bias = _frozen((num_experts, 2 * intermediate))
        self.down_bias = _frozen((num_experts, hidden))

    def run(self, expert: int, x: Tensor) -> Tensor:
        """Expert ``expert`` applied to its tokens x [n, H] -> [n, H]."""
        down_bias = self.down_bias[expert] if self.adds_down_bias else None
        if self.packed:
            blocks, scales = self.gate_up_blocks[expert], self.gate_up_scales[expert]
            h = swiglu(linear_mxfp4(x, blocks, scales, self.gate_up_bias[expert]), self.alpha, self.limit)
            return linear_mxfp4(h, self.down_blocks[expert], self.down_scales[expert], down_bias)
        h = swiglu(F.linear(x, self.gate_up[expert], self.gate_up_bias[expert]), self.alpha, self.limit)
        return F.linear(h, self.down[expert], down_bias)


class MoE(nn.Module):
    def __init__(
        self,
        hidden: int,
        intermediate: int,
        num_experts: int,
        experts_per_token: int,
        alpha: float,
        limit: float,
        packed: bool,
        tp: TensorParallel = SINGLE,
    ) -> None:
        super().__init__()
        self.experts_per_token = experts_per_token
        self.tp = tp
        self.router = nn.Linear(hidden, num_experts)  # replicated: every rank routes every token
        if splits_by_experts(num_experts, tp):
            local_experts = num_experts // tp.world_size
            self.expert_range = range(tp.rank * local_experts, (tp.rank + 1) * local_experts)
            self.experts = Experts(local_experts, hidden, intermediate, alpha, limit, packed)
        else:
            self.expert_range = range(num_experts)
            local_intermediate = tp.local(intermediate, "intermediate_size")
            self.experts = Experts(num_experts, hidden, local_intermediate, alpha, limit, packed, tp.is_first)

    def forward(self, x: Tensor) -> Tensor:
        """x [T, H] -> the routing-weighted sum of each token's k experts, [T, H].

        This rank's picks are gathered, weighted and summed back once for all its experts, so the only work
        paid per distinct expert is its run (at small widths the per-expert ops were most of the layer).
        """
        k = self.experts_per_token
        top_logits, top_experts = torch.topk(self.router(x), k, dim=-1)
        # Softmax over the k selected logits only; in float32, as the norms.
        route_weights = torch.softmax(top_logits.float(), dim=-1).to(x.dtype).flatten()
        picks_by_expert = torch.argsort(top_experts.flatten(), stable=True)  # (token, slot) picks, grouped
        counts = torch.bincount(top_experts.flatten(), minlength=self.router.out_features).tolist()
        local_counts = counts[self.expert_range.start : self.expert_range.stop]
        first = sum(counts[: self.expert_range.start])
        picks = picks_by_expert[first : first + sum(local_counts)]  # the picks of this rank's experts
        tokens = picks // k
        rows = x[tokens]  # each expert's inputs, then its outputs in their place (both [n, H])
        start = 0
        for expert, count in enumerate(local_counts):
            if count:
                rows[start : start + count] = self.experts.run(expert, rows[start : start + count])
            start += count
        out = torch.zeros_like(x).index_add_(0, tokens, rows.mul_(route_weights[picks, None]))
        return self.tp.all_reduce(out)
