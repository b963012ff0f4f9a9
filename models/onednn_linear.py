"""fp32 (or native bf16) linear layers on CPU through oneDNN, their weights reordered once, at load, into its
blocked layout.

torch.addmm on CPU calls MKL's sgemm, which handles the few rows of a decode step badly: on the 2-core
benchmark machine it streams 6-10 GB/s of weights at 2-16 rows (17 at one row) and reaches ~110 GFLOP/s
at 64, while oneDNN's inner product on a prepacked weight streams 17-19 GB/s at 1-4 rows and is 1.2-2x
faster up to 64 rows (bench/NOTES.md). The results agree with addmm to fp32 rounding.

Where the CPU multiplies bf16 natively (models/cpu_isa.py), a bf16 model runs the same layers on bf16 weights
and inputs: oneDNN accumulates the products in fp32 and rounds each output once to bf16.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from models.cpu_isa import cpu_isa


def onednn_usable(device: torch.device, dtype: torch.dtype) -> bool:
    """fp32 anywhere oneDNN is built in; bf16 only where the CPU has bf16 dot products (emulated, it crawls)."""
    native = dtype == torch.float32 or (dtype == torch.bfloat16 and cpu_isa().native_bf16)
    return device.type == "cpu" and native and torch.backends.mkldnn.is_available()


class OneDNNLinear(nn.Module):
    """``x @ weight.T + bias`` for ``weight`` [out, in]; holds only the reordered copy of the weight."""

    bias: Tensor | None

    def __init__(self, weight: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), None))
        self.register_buffer("bias", None if bias is None else bias.detach())

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
