"""GPT-OSS's mixture-of-experts MLP: a router picks k experts per token, each a clamped-SwiGLU MLP.

Tokens are grouped by expert and every selected expert runs once, on its own tokens, so the cost grows
with experts_per_token and never with the number of experts. Expert matrices are stored [out, in] as the
original checkpoint holds them, either as float tensors or as MXFP4 blocks (models.mxfp4) that are never
dequantized whole. On CPU all of a layer's expert runs go through one grouped call per matrix (torch's
grouped GEMM, or the MXFP4 kernel's grouped form), so no Python or parallel region is paid per expert.

With ``static_shapes`` set, routing and grouping stay on the device and every shape follows from the token
count alone (what a CUDA graph replay or ``torch.compile(fullgraph=True)`` needs): the groups' sizes go to
the grouped call as a tensor instead of being read on the host. It is off by default, since on CPU the host
sizes pick the cheaper call (a loop over few busy experts beats a grouped call over many idle ones).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.cpu_kernels import cpu_kernels_loaded
from models.mxfp4 import grouped_kernel, kernel_takes, linear_mxfp4, packed_shapes, widened
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


def top_k_experts(logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Each token's k largest router logits and their experts, equal logits to the lower expert (NaN first).

    torch.topk leaves the order of ties to its implementation, which differs between torch versions; bf16
    logits (8 significant bits) tie easily, and the fused decode layer (models/csrc/gpt_oss_decode_layer.cpp)
    must pick the same experts as this path."""
    values, experts = torch.sort(logits, dim=-1, descending=True, stable=True)
    return values[..., :k], experts[..., :k]


def each_expert(x: Tensor, counts: list[int], out_features: int, linear: Callable[[Tensor, int], Tensor]) -> Tensor:
    """``linear(x_e, e)`` for each expert e's rows x_e (counts[e] rows of x [N, I], in order) -> [N, out]."""
    out = x.new_empty(len(x), out_features)
    start = 0
    for expert, count in enumerate(counts):
        if count:
            out[start : start + count] = linear(x[start : start + count], expert)
        start += count
    return out


def grouped_linear(x: Tensor, counts: list[int], weight: Tensor, bias: Tensor | None) -> Tensor:
    """``F.linear(x_e, weight[e], bias[e])`` for each expert's rows x_e.

    On CPU torch's grouped GEMM runs the experts in one call, but it visits every group, empty or not; a loop
    over the experts that have rows pays about three times as much per expert in dispatch. So the grouped
    call runs unless fewer than a quarter of the experts have rows (few tokens over many experts: tiny
    GPT-OSS at batch 1, 128 experts, 1.26x -> 1.02x the 8-expert model's time per token). Other devices loop
    (their grouped kernels' layout and dtype limits are not checked here).
    """
    if x.device.type == "cpu" and 4 * sum(1 for count in counts if count) >= len(counts):
        offsets = torch.tensor(counts, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        out = F.grouped_mm(x, weight.transpose(-2, -1), offs=offsets)
        if bias is not None:
            out += bias.repeat_interleave(torch.tensor(counts), dim=0, output_size=len(x))
        return out
    return each_expert(x, counts, weight.shape[1],
                       lambda rows, e: F.linear(rows, weight[e], None if bias is None else bias[e]))


def grouped_linear_mxfp4(
    x: Tensor, counts: list[int], blocks: Tensor, scales: Tensor, bias: Tensor | None, float_bias: Tensor | None = None
) -> Tensor:
    """``linear_mxfp4`` of each expert's rows with its blocks[e], scales[e], bias[e] (``float_bias``: the same
    bias in fp32, for the kernel, where the caller holds one).

    When every expert's share fits the C++ kernel, one call runs them all: per expert, a Python call and a
    parallel region cost as much as a one-token run at small widths.
    """
    if kernel_takes(x, max(counts, default=0)):
        return grouped_kernel(x, counts, blocks, scales, widened(bias) if float_bias is None else float_bias)
    return each_expert(x, counts, blocks.shape[1], lambda rows, e: linear_mxfp4(
        rows, blocks[e], scales[e], None if bias is None else bias[e]))


def grouped_linear_static(
    x: Tensor, counts: Tensor, row_experts: Tensor, weight: Tensor, bias: Tensor | None
) -> Tensor:
    """``grouped_linear`` with the group sizes ``counts`` [E] as a tensor and each row's expert ``row_experts``."""
    out = F.grouped_mm(x, weight.transpose(-2, -1), offs=counts.cumsum(0, dtype=torch.int32))
    return out if bias is None else out + bias[row_experts]


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

    @property
    def runs_static(self) -> bool:
        """Float experts run through torch's grouped GEMM (any dtype on CPU; elsewhere it takes bfloat16 only),
        packed ones through the C++ kernel (float32 on CPU)."""
        on_cpu = self.gate_up_bias.device.type == "cpu"
        if self.packed:
            return on_cpu and self.gate_up_bias.dtype == torch.float32 and cpu_kernels_loaded()
        return on_cpu or self.gate_up.dtype == torch.bfloat16

    def run_static(self, x: Tensor, counts: Tensor, row_experts: Tensor) -> Tensor:
        """``run`` with the group sizes as a tensor (int64 [E]) and each row's expert: nothing read on the host."""
        down_bias = self.down_bias if self.adds_down_bias else None
        if self.packed:
            grouped = torch.ops.gptserve.mxfp4_grouped_linear
            h = grouped(x.contiguous(), counts, self.gate_up_blocks, self.gate_up_scales, self.gate_up_bias)
            return grouped(swiglu(h, self.alpha, self.limit).contiguous(), counts, self.down_blocks,
                           self.down_scales, down_bias)
        h = grouped_linear_static(x, counts, row_experts, self.gate_up, self.gate_up_bias)
        return grouped_linear_static(swiglu(h, self.alpha, self.limit), counts, row_experts, self.down, down_bias)

    @functools.cached_property
    def float_biases(self) -> tuple[Tensor, Tensor]:
        """The biases as the fp32 kernel reads them, widened once under a bf16 model (the same tensors under
        fp32): widening all E experts' every decode step opened two parallel regions a layer, and on a busy
        CPU each can wait a scheduler slice for its second thread."""
        return self.gate_up_bias.float(), self.down_bias.float()

    def _run_dequantized(self, rows: Tensor, expert: int) -> Tensor:
        """One packed expert's whole MLP on its rows (a prefill's share), each matrix dequantized for its
        product. Expert by expert, a prefill holds one expert's intermediate activations at a time instead of
        every pick's: 2,048 tokens x 4 picks x 5,760 bf16 values and swiglu's temporaries were ~0.4 GB of the
        served gpt-oss-20b-widths peak (bench/NOTES.md, session 13)."""
        h = linear_mxfp4(rows, self.gate_up_blocks[expert], self.gate_up_scales[expert], self.gate_up_bias[expert])
        down_bias = self.down_bias[expert] if self.adds_down_bias else None
        return linear_mxfp4(swiglu(h, self.alpha, self.limit), self.down_blocks[expert], self.down_scales[expert],
                            down_bias)

    def run(self, x: Tensor, counts: list[int]) -> Tensor:
        """x [N, H], its rows grouped by expert (counts[e] of them for expert e) -> each row's expert output."""
        if self.packed and not kernel_takes(x, max(counts, default=0)):
            return each_expert(x, counts, self.down_blocks.shape[1], self._run_dequantized)
        down_bias = self.down_bias if self.adds_down_bias else None
        if self.packed:
            up_float, down_float = self.float_biases
            h = grouped_linear_mxfp4(x, counts, self.gate_up_blocks, self.gate_up_scales, self.gate_up_bias, up_float)
            return grouped_linear_mxfp4(swiglu(h, self.alpha, self.limit), counts, self.down_blocks,
                                        self.down_scales, down_bias, down_float if self.adds_down_bias else None)
        h = grouped_linear(x, counts, self.gate_up, self.gate_up_bias)
        return grouped_linear(swiglu(h, self.alpha, self.limit), counts, self.down, down_bias)


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
        self.static_shapes = False  # see the module docstring
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
        top_logits, top_experts = top_k_experts(self.router(x), k)
        # Softmax over the k selected logits only; in float32, as the norms.
        route_weights = torch.softmax(top_logits.float(), dim=-1).to(x.dtype).flatten()
        if self.static_shapes:
            return self.tp.all_reduce(self._forward_static(x, top_experts.flatten(), route_weights))
        picks_by_expert = torch.argsort(top_experts.flatten(), stable=True)  # (token, slot) picks, grouped
        counts = torch.bincount(top_experts.flatten(), minlength=self.router.out_features).tolist()
        local_counts = counts[self.expert_range.start : self.expert_range.stop]
        first = sum(counts[: self.expert_range.start])
        picks = picks_by_expert[first : first + sum(local_counts)]  # the picks of this rank's experts
        tokens = picks // k
        rows = self.experts.run(x[tokens], local_counts)  # each pick's expert output, grouped by expert
        out = torch.zeros_like(x).index_add_(0, tokens, rows.mul_(route_weights[picks, None]))
        return self.tp.all_reduce(out)

    def _forward_static(self, x: Tensor, experts: Tensor, route_weights: Tensor) -> Tensor:
        """``forward``'s grouping with shapes that depend only on the token count: all T * k picks are sorted
        by expert and run. A pick of another rank's expert is run by this rank's nearest expert and weighted
        0: some wasted rows under expert parallelism, in exchange for no data-dependent shape."""
        num_local = len(self.expert_range)
        local = experts - self.expert_range.start
        mine = (local >= 0) & (local < num_local)
        local = local.clamp(0, num_local - 1)
        picks = torch.argsort(local, stable=True)
        row_experts = local[picks]
        counts = torch.zeros(num_local, dtype=torch.int64, device=x.device).index_add_(0, local, torch.ones_like(local))
        tokens = picks // self.experts_per_token
        rows = self.experts.run_static(x[tokens], counts, row_experts)
        weights = torch.where(mine[picks], route_weights[picks], 0.0)
        return torch.zeros_like(x).index_add_(0, tokens, rows * weights[:, None])
