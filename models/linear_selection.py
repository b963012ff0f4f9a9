"""Which implementation the linear layers of a loaded model run: one choice, made once at load for every family.

On CPU in fp32 (or bf16 where the CPU multiplies it natively) every plain ``nn.Linear`` becomes oneDNN's
(models/onednn_linear.py), or with bf16 weights the bf16-streaming layer (models/bf16_weight_linear.py), or in
a bf16 model on a CPU with AVX512-BF16 and no AMX the vdpbf16ps one (models/bf16_dot_linear.py); and the
logits layer one that computes fp32 logits whatever the model's dtype. With bf16 weights, or in a bf16 model,
the embeddings are looked up in bf16 too, a tied one in the unembedding's packed rows: no weight is held twice.
Elsewhere the layers stay torch's, and only the unembedding is stored the way torch's logits matmul reads it
fastest (models/logits_layout.py). Row-parallel layers keep their own forward: their partial products must be
summed over the ranks.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from models.bf16_dot_linear import Bf16DotLinear, bf16_dots_chosen
from models.bf16_weight_linear import Bf16Embedding, Bf16WeightLinear
from models.logits_layout import relayout_for_logits
from models.onednn_linear import OneDNNLinear, onednn_usable


def logits_linear(weight: Tensor, bf16_weights: bool) -> OneDNNLinear | Bf16WeightLinear:
    """The CPU unembedding: fp32 logits always, the bf16 layer wherever the weights are bf16 values."""
    if bf16_weights or weight.dtype == torch.bfloat16:
        return Bf16WeightLinear(weight, None)
    return OneDNNLinear(weight, None)


def use_bf16_embeddings(model: nn.Module, unembedding: Tensor | None, looked_up_as: torch.dtype) -> None:
    """Every ``nn.Embedding`` below ``model`` becomes a bf16 one whose rows come out in ``looked_up_as``: the one
    tied to ``unembedding`` reads the logits layer's packed rows, the others keep their own table in bf16 (their
    values are bf16 already)."""
    lm_head = getattr(model, "lm_head", None)
    for parent in list(model.modules()):
        for name, layer in list(parent.named_children()):
            if type(layer) is not nn.Embedding:
                continue
            tied = unembedding is not None and layer.weight.data_ptr() == unembedding.data_ptr()
            if tied and isinstance(lm_head, Bf16WeightLinear):
                setattr(parent, name, Bf16Embedding(tied_to=lm_head, dtype=looked_up_as))
            else:
                setattr(parent, name, Bf16Embedding(layer.weight, dtype=looked_up_as))


def use_onednn(
    model: nn.Module, unembedding: Tensor | None, bf16_weights: bool = False, bf16_dots: bool = False
) -> None:
    """Once, at load: ``model.lm_head`` becomes the CPU logits layer over ``unembedding`` [vocab, H] (None: a
    rank that computes no logits), and every plain ``nn.Linear`` below ``model`` a oneDNN one. With
    ``bf16_weights`` (weights already rounded) the linears and embeddings hold their weights once, in bf16;
    with ``bf16_dots`` (a bf16 model) the linears are the vdpbf16ps ones instead of oneDNN's. A bf16 model's
    tied embedding looks its rows up in the logits layer's packed copy, as under bf16 weights."""
    if unembedding is not None:  # a copy: a tied fp32 embedding stays as it is for the lookups
        model.lm_head = logits_linear(unembedding, bf16_weights)
    if bf16_weights:
        use_bf16_embeddings(model, unembedding, torch.float32)
    elif unembedding is not None and unembedding.dtype == torch.bfloat16:
        use_bf16_embeddings(model, unembedding, torch.bfloat16)
    linear = Bf16WeightLinear if bf16_weights else Bf16DotLinear if bf16_dots else OneDNNLinear
    for parent in list(model.modules()):
        for name, layer in list(parent.named_children()):
            if type(layer) is nn.Linear:  # not a subclass: row-parallel layers keep their own forward
                setattr(parent, name, linear(layer.weight, layer.bias))


def select_linears(
    model: nn.Module, unembedding: Tensor | None, device: torch.device, dtype: torch.dtype, bf16_weights: bool
) -> None:
    """oneDNN's layers where they are usable; elsewhere the unembedding relaid out for torch's matmul (oneDNN
    reorders it its own way, so a relayout first would only cost a copy)."""
    if onednn_usable(device, dtype):
        use_onednn(model, unembedding, bf16_weights, bf16_dots_chosen(device, dtype))
    elif unembedding is not None:
        relayout_for_logits(unembedding)
