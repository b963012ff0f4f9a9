"""fp32 CPU linear layers whose weights are rounded to bfloat16 and held only as bf16.

A decode step of a few rows reads every weight once and does little arithmetic on it: with two cores the
fp32 weights stream at ~20 GB/s, so GPT-2-124M's 0.5 GB a step caps batch-1 decoding near 40 tok/s. Stored
as bf16 and widened to fp32 in registers (models/csrc/bf16_linear.cpp), the same step reads half the bytes.
Every input size runs on that one bf16 copy: through the kernel's dots, or, for inputs of many rows
(prefill, perplexity) on a CPU without AVX-512, through a GEMM on fp32 tiles widened from it.
Products are exact and sums fp32 on either path; only the order of the sums differs.

A bf16 model's logits come from this layer too: its bf16 hidden states widened to fp32 and multiplied by the
bf16 unembedding in fp32, so the sampler reads exact sums, not logits rounded to bf16's 8 bits. Embeddings
are looked up in bf16 as well (``Bf16Embedding``), a tied one in the unembedding's own packed rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.cpu_isa import cpu_isa
from models.cpu_kernels import cpu_kernels_loaded

# Without AVX-512, inputs of more than this many rows go through the widened tiles, where BLAS's GEMM beats
# the AVX2 dots. With it the dots take every size: ahead of the tiles up to 128 rows, level at 512, and one
# parallel region a call where the tiles need several (bench/NOTES.md).
KERNEL_MAX_ROWS = 128
PACK_CHUNK_ROWS = 1 << 15  # packing converts this many rows at a time: no full-size temporary copy
LANES = 32  # outputs per packed group


def pack_bf16_weight(weight: Tensor) -> Tensor:
    """[N, K] float -> [ceil(N/32), ceil(K/2), 32, 2] int16 bf16 bits: 32 outputs side by side, each with two
    consecutive inputs in one 32-bit word, the kernel's layout, where one 64-byte load widens to the weights of
    two inputs for sixteen outputs (rows past N and the input past an odd K are zero)."""
    n, k = weight.shape
    pairs = -(-k // 2)
    packed = torch.zeros(-(-n // LANES), pairs, LANES, 2, dtype=torch.int16)
    for start in range(0, n, PACK_CHUNK_ROWS):
        chunk = weight.detach()[start : start + PACK_CHUNK_ROWS].to(torch.bfloat16)
        chunk = F.pad(chunk, (0, 2 * pairs - k, 0, -len(chunk) % LANES)).view(torch.int16)
        packed[start // LANES : start // LANES + len(chunk) // LANES] = chunk.view(-1, LANES, pairs, 2).transpose(1, 2)
    return packed


class Bf16WeightLinear(nn.Module):
    """``x @ weight.T + bias`` in fp32 for ``weight`` [out, in] whose values are already bf16-representable
    (``x`` of any float dtype is widened first). Holds the weight once: ``packed`` for the C++ kernels, or,
    where they did not build, the plain bf16 matrix (``plain``), widened a chunk of rows at a time."""

    packed: Tensor | None
    plain: Tensor | None
    bias: Tensor | None

    def __init__(self, weight: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        kernels = cpu_kernels_loaded()
        self.register_buffer("packed", pack_bf16_weight(weight) if kernels else None)
        self.register_buffer("plain", None if kernels else weight.detach().to(torch.bfloat16))
        self.register_buffer("bias", None if bias is None else bias.detach().float())

    def forward(self, x: Tensor) -> Tensor:
        x = x.float()
        rows = x.reshape(-1, x.shape[-1]).contiguous()
        if self.packed is None:
            assert self.plain is not None
            out = torch.cat([F.linear(rows, w.float()) for w in self.plain.split(PACK_CHUNK_ROWS)], dim=1)
            out = out if self.bias is None else out + self.bias
        elif rows.shape[0] <= KERNEL_MAX_ROWS or cpu_isa().avx512:
            out = torch.ops.gptserve.bf16_linear(rows, self.packed, self.bias, self.out_features)
        else:
            out = torch.ops.gptserve.bf16_linear_tiles(rows, self.packed, self.bias, self.out_features)
        return out.view(*x.shape[:-1], self.out_features)

    def weight_rows(self, ids: Tensor) -> Tensor:
        """Rows ``ids`` of the weight, in fp32: the lookups of an embedding tied to this matrix."""
        if self.packed is None:
            assert self.plain is not None
            return F.embedding(ids, self.plain).float()
        # row n is lane n % 32 of group n // 32: [len(ids), pairs, 2] bf16 bits, the last pair's second one
        # padding where in_features is odd
        bits = self.packed[ids // LANES, :, ids % LANES].flatten(-2)[..., : self.in_features]
        return bits.view(torch.bfloat16).float()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Bf16Embedding(nn.Module):
    """An embedding whose table is bf16 values, looked up in ``dtype`` (fp32 under bf16 weights, bf16 in a bf16
    model): from its own bf16 table, or, tied to the unembedding, from that layer's packed rows (``tied_to``),
    so the matrix is held once."""

    weight: Tensor | None

    def __init__(self, weight: Tensor | None = None, tied_to: Bf16WeightLinear | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.register_buffer("weight", None if weight is None else weight.detach().to(torch.bfloat16))
        self._tied = [tied_to] if tied_to is not None else []  # a list: not a second owner in the module tree
        self.dtype = dtype

    def forward(self, ids: Tensor) -> Tensor:
        if self._tied:
            return self._tied[0].weight_rows(ids.reshape(-1)).view(*ids.shape, -1).to(self.dtype)
        assert self.weight is not None
        return F.embedding(ids, self.weight).to(self.dtype)
