"""GPT-2: learned positions, pre-LayerNorm blocks, causal multi-head attention, tanh-GELU MLP, tied lm_head.

Module names mirror the HuggingFace export (``h.N.attn.c_attn`` ...), and projections keep its Conv1D
layout (weight stored [in, out], applied as ``x @ W + b``), so checkpoint tensors load without transposes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.attention import paged_attention
from models.bf16_weight_linear import Bf16WeightLinear, logits_linear
from models.checkpoint import Checkpoint, CheckpointError, config_float, config_int, read_json
from models.forward_batch import ForwardBatch, Interrupt, check_interrupt
from models.kv_cache import KVCacheSpec, PagedKVCache
from models.logits_layout import relayout_for_logits
from models.onednn_linear import OneDNNLinear
from models.parallel import SINGLE, TensorParallel

# Tensor-parallel splits, by parameter name within a block: (dimension split over ranks, fused parts in it).
# c_attn and c_fc are column-parallel (q, k, v each split by heads); the c_proj weights are row-parallel.
BLOCK_SPLITS = {
    "attn.c_attn.weight": (1, 3),
    "attn.c_attn.bias": (0, 3),
    "attn.c_proj.weight": (0, 1),
    "mlp.c_fc.weight": (1, 1),
    "mlp.c_fc.bias": (0, 1),
    "mlp.c_proj.weight": (0, 1),
}


@dataclass(frozen=True, slots=True)
class GPT2Config:
    vocab_size: int
    n_positions: int
    n_embd: int
    n_layer: int
    n_head: int
    n_inner: int
    layer_norm_epsilon: float
    eos_token_id: int

    @classmethod
    def from_json(cls, config: dict) -> "GPT2Config":
        for unsupported in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
            if config.get(unsupported):
                raise CheckpointError(f"config.json: {unsupported}=true is not supported")
        activation = config.get("activation_function", "gelu_new")
        if activation not in ("gelu_new", "gelu_pytorch_tanh"):
            raise CheckpointError(f"config.json: activation_function={activation!r} is not supported (expected gelu_new)")
        n_embd = config_int(config, "n_embd")
        n_head = config_int(config, "n_head", high=n_embd)
        if n_embd % n_head:
            raise CheckpointError(f"config.json: n_embd={n_embd} is not divisible by n_head={n_head}")
        vocab_size = config_int(config, "vocab_size")
        return cls(
            vocab_size=vocab_size,
            n_positions=config_int(config, "n_positions", default=config.get("n_ctx")),
            n_embd=n_embd,
            n_layer=config_int(config, "n_layer", high=1024),
            n_head=n_head,
            n_inner=config_int(config, "n_inner", default=4 * n_embd),
            layer_norm_epsilon=config_float(config, "layer_norm_epsilon", 0.0, 1.0, default=1e-5),
            eos_token_id=config_int(config, "eos_token_id", low=0, high=vocab_size - 1, default=50256),
        )

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


class Conv1D(nn.Module):
    """A linear layer with its weight stored [in, out], as GPT-2 checkpoints hold it."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_in, n_out))
        self.bias = nn.Parameter(torch.empty(n_out))

    def forward(self, x: Tensor) -> Tensor:
        return torch.addmm(self.bias, x, self.weight)


class RowParallelConv1D(Conv1D):
    """A Conv1D whose input features are split over the ranks: partial products are summed, then the bias added."""

    def __init__(self, n_in: int, n_out: int, tp: TensorParallel) -> None:
        super().__init__(n_in, n_out)
        self.tp = tp

    def forward(self, x: Tensor) -> Tensor:
        return self.tp.all_reduce(x @ self.weight) + self.bias


def output_projection(n_in: int, n_out: int, tp: TensorParallel) -> Conv1D:
    return Conv1D(n_in, n_out) if tp.world_size == 1 else RowParallelConv1D(n_in, n_out, tp)


class GPT2Attention(nn.Module):
    def __init__(self, config: GPT2Config, tp: TensorParallel) -> None:
        super().__init__()
        self.num_heads = tp.local(config.n_head, "n_head")
        self.head_dim = config.head_dim
        self.c_attn = Conv1D(config.n_embd, 3 * self.num_heads * self.head_dim)
        self.c_proj = output_projection(self.num_heads * self.head_dim, config.n_embd, tp)

    def forward(self, x: Tensor, batch: ForwardBatch, cache: tuple[Tensor, Tensor]) -> Tensor:
        q, k, v = self.c_attn(x).view(-1, 3, self.num_heads, self.head_dim).unbind(1)
        out = paged_attention(q, k, v, cache, batch.view(0))  # one KV group: every layer attends in full
        return self.c_proj(out.reshape(x.shape[0], -1))


class GPT2MLP(nn.Module):
    def __init__(self, config: GPT2Config, tp: TensorParallel) -> None:
        super().__init__()
        n_inner = tp.local(config.n_inner, "n_inner")
        self.c_fc = Conv1D(config.n_embd, n_inner)
        self.c_proj = output_projection(n_inner, config.n_embd, tp)

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class GPT2Block(nn.Module):
    def __init__(self, config: GPT2Config, tp: TensorParallel) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = GPT2Attention(config, tp)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = GPT2MLP(config, tp)

    def forward(self, h: Tensor, batch: ForwardBatch, cache: tuple[Tensor, Tensor]) -> Tensor:
        h = h + self.attn(self.ln_1(h), batch, cache)
        return h + self.mlp(self.ln_2(h))


class GPT2(nn.Module):
    """With a TensorParallel of N ranks: this rank's 1/N of the heads and MLP columns; embeddings replicated."""

    def __init__(self, config: GPT2Config, tp: TensorParallel = SINGLE) -> None:
        super().__init__()
        self.config = config
        self.tp = tp
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.h = nn.ModuleList(GPT2Block(config, tp) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.lm_head: OneDNNLinear | Bf16WeightLinear | None = None  # None: logits straight from the tied wte.weight

    def use_onednn(self, bf16_weights: bool = False) -> None:
        """CPU, fp32 or native bf16: run the projections and the lm_head through oneDNN
        (models/onednn_linear.py); the lm_head becomes a reordered copy of the tied embedding, which stays as it
        is for the lookups, and computes fp32 logits whatever the model's dtype. With ``bf16_weights`` (weights
        already rounded) decode-sized inputs stream bf16 copies instead (models/bf16_weight_linear.py)."""
        linear = Bf16WeightLinear if bf16_weights else OneDNNLinear
        for block in self.h:
            for parent, name in ((block.attn, "c_attn"), (block.attn, "c_proj"), (block.mlp, "c_fc"), (block.mlp, "c_proj")):
                layer = getattr(parent, name)
                if type(layer) is Conv1D:  # row-parallel layers keep their own forward
                    setattr(parent, name, linear(layer.weight.T, layer.bias))
        self.lm_head = logits_linear(self.wte.weight, bf16_weights)

    def relayout_unembedding(self) -> None:
        """Off the oneDNN path: the tied embedding stored the way MKL's logits matmul reads it fastest."""
        relayout_for_logits(self.wte.weight)

    @property
    def max_context(self) -> int:
        return self.config.n_positions

    @property
    def captures_cuda_graphs(self) -> bool:
        """A single-rank forward runs no host syncs and no collectives, so a decode step can be replayed."""
        return self.tp.world_size == 1

    @property
    def interruptible(self) -> bool:
        """``forward`` stops between layers when its ``interrupt`` says so (the engine gives decode steps up for
        a newcomer's prompt)."""
        return True

    def kv_cache_spec(self) -> KVCacheSpec:
        return KVCacheSpec(self.config.n_layer, self.h[0].attn.num_heads, self.config.head_dim)

    def forward(self, batch: ForwardBatch, cache: PagedKVCache, interrupt: Interrupt | None = None) -> Tensor:
        """Final hidden states of every token; raises ForwardInterrupted if ``interrupt`` fires between blocks."""
        h = self.wte(batch.input_ids) + self.wpe(batch.positions)
        for index, block in enumerate(self.h):
            check_interrupt(interrupt)
            h = block(h, batch, cache.layer(index))
        return self.ln_f(h)

    def compute_logits(self, hidden: Tensor) -> Tensor:
        """The lm_head is the token embedding (tied), as in every GPT-2 export."""
        if self.lm_head is not None:
            return self.lm_head(hidden)
        return F.linear(hidden, self.wte.weight).float()


def load_gpt2(
    model_dir: Path, dtype: torch.dtype, device: torch.device | str, tp: TensorParallel = SINGLE
) -> GPT2:
    """Load an HF-layout GPT-2, with or without the ``transformer.`` prefix; a separate lm_head is ignored (tied).

    A tensor-parallel rank reads only its slices of the split weights."""
    config = GPT2Config.from_json(read_json(model_dir / "config.json"))
    checkpoint = Checkpoint(model_dir)
    prefix = "transformer." if checkpoint.has("transformer.wte.weight") else ""
    with torch.device("meta"):
        model = GPT2(config, tp)
    state = {}
    for name, param in model.named_parameters():
        split = BLOCK_SPLITS.get(re.sub(r"^h\.\d+\.", "", name)) if tp.world_size > 1 else None
        if split is None:
            state[name] = checkpoint.get(prefix + name, shape=tuple(param.shape), dtype=dtype, device=device)
            continue
        dim, parts = split
        shape = list(param.shape)
        shape[dim] *= tp.world_size
        ranges = tp.ranges(*[shape[dim] // parts] * parts)
        state[name] = checkpoint.get_slices(prefix + name, dim, ranges, tuple(shape), dtype, device)
    model.load_state_dict(state, assign=True, strict=True)
    return model.eval().requires_grad_(False)
