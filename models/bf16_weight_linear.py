"""fp32 CPU linear layers whose weights are rounded to bfloat16 and streamed as bf16 in decode steps.

A decode step of a few rows reads every weight once and does little arithmetic on it: with two cores the
fp32 weights stream at ~20 GB/s, so GPT-2-124M's 0.5 GB a step caps batch-1 decoding near 40 tok/s. Stored
as bf16 and widened to fp32 in registers (models/csrc/bf16_linear.cpp), the same step reads half the bytes.
Inputs of more rows run oneDNN's fp32 inner product on an fp32 copy of the same rounded values, so every
batch size computes with identical weights; only the order of the fp32 sums differs.

A bf16 model's logits come from this layer too: its bf16 hidden states widened to fp32 and multiplied by the
bf16 unembedding in fp32, so the sampler reads exact sums, not logits rounded to bf16's 8 bits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.cpu_kernels import cpu_kernels_loaded
from models.onednn_linear import OneDNNLinear

# Inputs of at most this many rows go through the bf16 kernel: twelve GPT-2-124M layers took 6.7 / 7.6 / 22 /
# 42 ms at 1 / 4 / 16 / 32 rows against oneDNN's 14.1 / 17.2 / 29 / 45, and the same at 64 (bench/NOTES.md).
KERNEL_MAX_ROWS = 32


def round_to_bf16_(module: nn.Module) -> None:
    """Round every floating-point weight to its nearest bfloat16 value, kept as float32 (buffers such as
    rotary tables are derived, not loaded, and stay exact)."""
    for param in module.parameters():
        if param.is_floating_point():
            param.data.copy_(param.data.to(torch.bfloat16))


def pack_bf16_weight(weight: Tensor) -> Tensor:
    """[N, K] float -> [ceil(N/8), K, 8] int16 bf16 bits, eight outputs side by side: the kernel's layout,
    where one 16-byte load feeds eight accumulators (rows past N are zero)."""
    n, k = weight.shape
    padded = F.pad(weight.detach(), (0, 0, 0, -n % 8))
    return padded.to(torch.bfloat16).view(torch.int16).view(-1, 8, k).transpose(1, 2).contiguous()


class Bf16WeightLinear(nn.Module):
    """``x @ weight.T + bias`` in fp32 for ``weight`` [out, in] whose values are already bf16-representable
    (``x`` of any float dtype is widened first)."""

    packed: Tensor | None

    def __init__(self, weight: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        self.gemm = OneDNNLinear(weight, bias)
        self.out_features = weight.shape[0]
        # without the C++ kernels every input takes the oneDNN path: same weights, same results, full bytes
        packed = pack_bf16_weight(weight) if cpu_kernels_loaded() else None
        self.register_buffer("packed", packed)

    @property
    def bias(self) -> Tensor | None:
        return self.gemm.bias

    def forward(self, x: Tensor) -> Tensor:
        x = x.float()
        rows = x.reshape(-1, x.shape[-1])
        if self.packed is None or rows.shape[0] > KERNEL_MAX_ROWS:
            return self.gemm(x)
        out = torch.ops.gptserve.bf16_linear(rows.contiguous(), self.packed, self.bias, self.out_features)
        return out.view(*x.shape[:-1], self.out_features)

