"""The two ways a model's linear layers run, so the oracle tests can cover both on CPU."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models.onednn_linear import OneDNNLinear, onednn_usable

PATHS = ["plain", "onednn"]  # torch's own matmuls; the oneDNN linears the server uses for fp32 on CPU


def on_path(model: nn.Module, path: str, device: torch.device) -> nn.Module:
    if path == "onednn":
        if not onednn_usable(device, torch.float32):
            pytest.skip("oneDNN linears serve fp32 on CPU only")
        model.use_onednn()
    return model


def on_same_path(other: nn.Module, model: nn.Module) -> nn.Module:
    """``other`` switched to ``model``'s linear path, so that their logits compare bit for bit."""
    if isinstance(model.lm_head, OneDNNLinear):
        other.use_onednn()
    return other
