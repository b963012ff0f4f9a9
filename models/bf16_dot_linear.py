"""A bf16 model's linear layers on CPUs with AVX512-BF16 but no AMX: bf16 in, bf16 out, dotted by vdpbf16ps.

oneDNN's inner product on its prepacked bf16 weight is what a bf16 model's layers otherwise run. On two Zen 4
cores it streamed GPT-OSS's attention projections at 20-30 GB/s at one row, where a plain read of the same
bytes reached 29-46 GB/s, and a decode step is bound by that stream. The kernel here
(models/csrc/bf16_dot_linear.cpp) reads the packed layout of the bf16-weight layer, runs at the read's rate
at one row and 1.2x oneDNN's at four, and runs prompts at 0.92-0.98x its GEMM rate (bench/NOTES.md, session
14). Where the CPU has AMX, oneDNN's tiles multiply prompts several times faster and keep the layers.
Results agree with oneDNN's to bf16 rounding: both sum exact products in float32 and round each output once.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from models.bf16_weight_linear import pack_bf16_weight
from models.cpu_isa import cpu_isa
from models.cpu_kernels import cpu_kernels_loaded


def bf16_dots_chosen(device: torch.device, dtype: torch.dtype) -> bool:
    """bf16 compute on a CPU whose fastest bf16 product is vdpbf16ps, with the kernels built."""
    isa = cpu_isa()
    return (device.type == "cpu" and dtype == torch.bfloat16 and isa.avx512_bf16 and not isa.amx_bf16
            and cpu_kernels_loaded())


class Bf16DotLinear(nn.Module):
    """``x @ weight.T + bias`` for bf16 ``x`` and ``weight`` [out, in], summed in fp32 and rounded to bf16;
    holds only the packed weight (and the bias in fp32, which it adds before the rounding)."""

    packed: Tensor
    bias: Tensor | None

    def __init__(self, weight: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("packed", pack_bf16_weight(weight))
        self.register_buffer("bias", None if bias is None else bias.detach().float())

    def forward(self, x: Tensor) -> Tensor:
        rows = x.reshape(-1, self.in_features).contiguous()
        out = torch.ops.gptserve.bf16_dot_linear(rows, self.packed, self.bias, self.out_features)
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
