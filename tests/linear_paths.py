"""The two ways a model's linear layers run, so the oracle tests can cover both on CPU."""

from __future__ import annotations

from typing import TypeVar

import pytest
import torch

from models.gpt2 import GPT2
from models.gpt_oss import GptOss
from models.linear_selection import use_onednn
from models.onednn_linear import OneDNNLinear, onednn_usable

Model = TypeVar("Model", GPT2, GptOss)
PATHS = ["plain", "onednn"]  # torch's own matmuls; the oneDNN linears the server uses for fp32 on CPU


def on_path(model: Model, path: str, device: torch.device) -> Model:
    if path == "onednn":
        if not onednn_usable(device, torch.float32):
            pytest.skip("oneDNN linears serve fp32 on CPU only")
        use_onednn(model, model.unembedding)
    return model


def on_same_path(other: Model, model: GPT2 | GptOss) -> Model:
    """``other`` switched to ``model``'s linear path, so that their logits compare bit for bit."""
    if isinstance(model.lm_head, OneDNNLinear):
        use_onednn(other, other.unembedding)
    return other
