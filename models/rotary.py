"""Rotary position embedding with YaRN context extension, as GPT-OSS uses it (see arXiv:2309.00071).

YaRN keeps the fast-rotating frequencies as trained (extrapolation), divides the slow ones by ``factor``
(interpolation), blends linearly in between, and scales cos/sin by the "concentration" 0.1 ln(factor) + 1.
Rotation pairs dimension j with j + head_dim/2 (the two halves), not neighbouring dimensions.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def yarn_inv_freq(
    head_dim: int,
    theta: float,
    factor: float,
    original_context: int,
    beta_fast: float,
    beta_slow: float,
    truncate: bool = False,
) -> Tensor:
    """[head_dim / 2] float32 angular frequencies; plain RoPE when ``factor`` is 1."""
    base_freq = theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device="cpu") / head_dim)
    extrapolation = 1.0 / base_freq
    interpolation = 1.0 / (factor * base_freq)

    def dim_with_rotations(rotations: float) -> float:
        """The dimension whose wavelength fits ``rotations`` times into the original context."""
        return head_dim * math.log(original_context / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_with_rotations(beta_fast), dim_with_rotations(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # a zero-width ramp would divide by zero
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1 where the frequency is kept as trained
    return interpolation * (1 - keep) + extrapolation * keep


class YarnRotary:
    """cos/sin for a batch's positions, computed on the fly (cheap next to a layer, and shared by all layers)."""

    def __init__(
        self,
        head_dim: int,
        theta: float,
        factor: float = 1.0,
        original_context: int = 4096,
        beta_fast: float = 32.0,
        beta_slow: float = 1.0,
        truncate: bool = False,
    ) -> None:
        self.inv_freq = yarn_inv_freq(head_dim, theta, factor, original_context, beta_fast, beta_slow, truncate)
        self.concentration = 0.1 * math.log(factor) + 1.0 if factor > 1.0 else 1.0

    def cos_sin(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """positions [T] -> cos, sin [T, head_dim / 2] in ``dtype`` (computed in float32)."""
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        angles = positions[:, None].float() * self.inv_freq
        return (angles.cos() * self.concentration).to(dtype), (angles.sin() * self.concentration).to(dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [T, heads, head_dim] rotated by cos, sin [T, head_dim / 2]."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    first, second = x.chunk(2, dim=-1)
    return torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)
