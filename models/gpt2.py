"""GPT-2: learned positions, pre-LayerNorm blocks, causal multi-head attention, tanh-GELU MLP, tied lm_head.

Module names mirror the HuggingFace export (``h.N.attn.c_attn`` ...). Its Conv1D projections hold their
weights [in, out]; here they are ``nn.Linear`` layers whose [out, in] weight is a transposed view of the
checkpoint's tensor (no copy), so ``F.linear`` multiplies by the stored matrix as Conv1D's ``x @ W + b`` did.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.attention import paged_attention
from models.bf16_weight_linear import Bf16WeightLinear
from models.checkpoint import Checkpoint, CheckpointError, config_float, config_int, read_json
from models.forward_batch import ForwardBatch, Interrupt, check_interrupt
from models.gpt2_decode_block import fused_block_weights, fused_decode_applies, fused_decode_block
from models.kv_cache import KVCacheSpec, PagedKVCache
from models.onednn_linear import OneDNNLinear
from models.parallel import SINGLE, TensorParallel, row_parallel_linear
from models.servable import Capabilities, ServableModel

# Tensor-parallel splits, by parameter name within a block: (dimension of the checkpoint's tensor split over
# ranks, fused parts in it). c_attn and c_fc are column-parallel (q, k, v each split by heads); the c_proj
# weights are row-parallel.
BLOCK_SPLITS = {
    "attn.c_attn.weight": (1, 3),
    "attn.c_attn.bias": (0, 3),
    "attn.c_proj.weight": (0, 1),
    "mlp.c_fc.weight": (1, 1),
    "mlp.c_fc.bias": (0, 1),
    "mlp.c_proj.weight": (0, 1),
}

# Stored [in, out] (Conv1D): read as stored, then viewed transposed as the nn.Linear's [out, in] weight.
CONV1D_WEIGHTS = {"attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"}


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
    def from_json(cls, config: dict) -> GPT2Config:
        for unsupported in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
            if config.get(unsupported):
                raise CheckpointError(f"config.json: {unsupported}=true is not supported")
        activation = config.get("activation_function", "gelu_new")
        if activation not in ("gelu_new", "gelu_pytorch_tanh"):
            raise CheckpointError(
                f"config.json: activation_function={activation!r} is not supported (expected gelu_new)")
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

    @property
    def hidden_size(self) -> int:
        """The hidden states' width, by the name GPT-OSS's config gives it."""
        return self.n_embd


class GPT2Attention(nn.Module):
    def __init__(self, config: GPT2Config, tp: TensorParallel) -> None:
        super().__init__()
        self.num_heads = tp.local(config.n_head, "n_head")
        self.head_dim = config.head_dim
        self.c_attn = nn.Linear(config.n_embd, 3 * self.num_heads * self.head_dim)
        self.c_proj = row_parallel_linear(self.num_heads * self.head_dim, config.n_embd, tp)

    def forward(self, x: Tensor, batch: ForwardBatch, cache: tuple[Tensor, Tensor]) -> Tensor:
        q, k, v = self.c_attn(x).view(-1, 3, self.num_heads, self.head_dim).unbind(1)
        out = paged_attention(q, k, v, cache, batch.view(0))  # one KV group: every layer attends in full
        return self.c_proj(out.reshape(x.shape[0], -1))


class GPT2MLP(nn.Module):
    def __init__(self, config: GPT2Config, tp: TensorParallel) -> None:
        super().__init__()
        n_inner = tp.local(config.n_inner, "n_inner")
        self.c_fc = nn.Linear(config.n_embd, n_inner)
        self.c_proj = row_parallel_linear(n_inner, config.n_embd, tp)

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class GPT2Block(nn.Module):
    def __init__(self, config: GPT2Config, tp: TensorParallel) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = GPT2Attention(config, tp)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = GPT2MLP(config, tp)
        self._fused_weights: list[Tensor] | None = None
        self._fused_looked_up = False

    def fused_weights(self) -> list[Tensor] | None:
        """The fused decode kernel's weights, looked up at the first forward: the linears are chosen at load,
        after construction (models/linear_selection.py)."""
        if not self._fused_looked_up:
            self._fused_weights = fused_block_weights(self.ln_1, self.attn, self.ln_2, self.mlp)
            self._fused_looked_up = True
        return self._fused_weights

    def forward(self, h: Tensor, batch: ForwardBatch, cache: tuple[Tensor, Tensor]) -> Tensor:
        weights = self.fused_weights()
        if weights is not None and fused_decode_applies(h, batch.view(0)):
            return fused_decode_block(h, weights, cache, batch.view(0), self.attn.num_heads, self.ln_1.eps)
        h = h + self.attn(self.ln_1(h), batch, cache)
        return h + self.mlp(self.ln_2(h))


class GPT2(nn.Module, ServableModel):
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

    @property
    def unembedding(self) -> Tensor:
        """The matrix the logits multiply by: the token embedding (tied), as in every GPT-2 export."""
        return self.wte.weight

    @property
    def max_context(self) -> int:
        return self.config.n_positions

    @property
    def capabilities(self) -> Capabilities:
        """A single-rank forward runs no host syncs and no collectives; every forward stops between layers when
        its ``interrupt`` says so."""
        return Capabilities(captures_cuda_graphs=self.tp.world_size == 1, interruptible=True)

    def kv_cache_spec(self) -> KVCacheSpec:
        return KVCacheSpec(self.config.n_layer, self.config.n_head // self.tp.world_size, self.config.head_dim)

    def forward(self, batch: ForwardBatch, cache: PagedKVCache, interrupt: Interrupt | None = None) -> Tensor:
        """Final hidden states of every token; raises ForwardInterrupted if ``interrupt`` fires between blocks."""
        h = self.wte(batch.input_ids) + self.wpe(batch.positions)
        for index, block in enumerate(self.h):
            check_interrupt(interrupt)
            h = block(h, batch, cache.layer(index))
        return self.ln_f(h)

    def compute_logits(self, hidden: Tensor) -> Tensor:
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
        block_name = re.sub(r"^h\.\d+\.", "", name)
        transposed = block_name in CONV1D_WEIGHTS
        shape = list(param.shape)[::-1] if transposed else list(param.shape)  # as the checkpoint stores it
        split = BLOCK_SPLITS.get(block_name) if tp.world_size > 1 else None
        if split is None:
            tensor = checkpoint.get(prefix + name, shape=tuple(shape), dtype=dtype, device=device)
        else:
            dim, parts = split
            shape[dim] *= tp.world_size
            ranges = tp.ranges(*[shape[dim] // parts] * parts)
            tensor = checkpoint.get_slices(prefix + name, dim, ranges, tuple(shape), dtype, device)
        state[name] = tensor.T if transposed else tensor
    model.load_state_dict(state, assign=True, strict=True)
    return model.eval().requires_grad_(False)
