"""GPT-OSS: OpenAI's open-weight mixture-of-experts transformer, over the paged KV cache.

Per layer: RMSNorm -> attention (GQA, YaRN rotary, learned sinks, a sliding window on some layers) ->
residual -> RMSNorm -> MoE -> residual; then a final RMSNorm and an untied unembedding. Numerically as
openai/gpt-oss's torch reference: norms in float32 with float32 scales, everything else in the load dtype.
"""

from __future__ import annotations

from pathlib import Path
from typing import cast

import torch
from torch import Tensor, nn

from models.attention import paged_attention
from models.checkpoint import Checkpoint, read_json
from models.forward_batch import ForwardBatch, Interrupt, KVView, check_interrupt
from models.gpt_oss_config import GptOssConfig, is_original_gpt_oss_config
from models.gpt_oss_decode_layer import fused_decode_applies, fused_decode_layer, fused_layer_weights
from models.gpt_oss_weights import read_state, stores_mxfp4
from models.kv_cache import KVCacheSpec, PagedKVCache
from models.moe import MoE
from models.parallel import SINGLE, TensorParallel, row_parallel_linear
from models.rotary import YarnRotary, apply_rotary
from models.servable import Capabilities, ServableModel

__all__ = ["GptOss", "GptOssConfig", "is_original_gpt_oss_config", "load_gpt_oss"]


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(size, dtype=torch.float32))

    def forward(self, x: Tensor) -> Tensor:
        t = x.float()
        t = t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * t).to(x.dtype)


class GptOssAttention(nn.Module):
    """With N ranks: this rank's 1/N of the query heads, of the KV heads (GQA groups stay whole) and sinks."""

    def __init__(self, config: GptOssConfig, window: int | None, tp: TensorParallel) -> None:
        super().__init__()
        self.window = window
        self.head_dim = config.head_dim
        num_heads = tp.local(config.num_heads, "num_attention_heads")
        num_kv_heads = tp.local(config.num_kv_heads, "num_key_value_heads")
        self.split = [num_heads * config.head_dim] + 2 * [num_kv_heads * config.head_dim]
        self.qkv = nn.Linear(config.hidden_size, sum(self.split))
        self.out = row_parallel_linear(num_heads * config.head_dim, config.hidden_size, tp)
        self.sinks = nn.Parameter(torch.empty(num_heads))

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, kv: KVView, cache: tuple[Tensor, Tensor]) -> Tensor:
        q, k, v = (t.unflatten(-1, (-1, self.head_dim)) for t in self.qkv(x).split(self.split, dim=-1))
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = paged_attention(q, k, v, cache, kv, window=self.window, sinks=self.sinks)
        return self.out(out.flatten(-2))


class GptOssBlock(nn.Module):
    def __init__(self, config: GptOssConfig, layer: int, packed_experts: bool, tp: TensorParallel) -> None:
        super().__init__()
        window = config.sliding_window if config.sliding_layers[layer] else None
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = GptOssAttention(config, window, tp)
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.moe = MoE(
            config.hidden_size,
            config.intermediate_size,
            config.num_experts,
            config.experts_per_token,
            config.swiglu_alpha,
            config.swiglu_limit,
            packed_experts,
            tp,
        )
        self._fused_weights: list[Tensor] | None = None
        self._fused_looked_up = False

    def fused_weights(self) -> list[Tensor] | None:
        """The fused decode kernel's weights, looked up at the first forward: the linears are chosen at load,
        after construction (models/linear_selection.py). None under static routing, whose steps stay one graph
        for torch.compile and CUDA graphs (the kernel needs packed bf16 experts, which static routing refuses)."""
        if self.moe.static_shapes:
            return None
        if not self._fused_looked_up:
            attn = self.attn
            self._fused_weights = fused_layer_weights((self.attn_norm.weight, self.mlp_norm.weight), attn.qkv, attn.out,
                                                      attn.sinks, self.moe)
            self._fused_looked_up = True
        return self._fused_weights

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, kv: KVView, cache: tuple[Tensor, Tensor]) -> Tensor:
        weights = self.fused_weights()
        if weights is not None and fused_decode_applies(x, kv):
            return fused_decode_layer(x, weights, cos, sin, kv, cache, window=self.attn.window,
                                      head_dim=self.attn.head_dim, eps=self.attn_norm.eps, moe=self.moe)
        x = x + self.attn(self.attn_norm(x), cos, sin, kv, cache)
        return x + self.moe(self.mlp_norm(x))


class GptOss(nn.Module, ServableModel):
    """With a TensorParallel of N ranks: attention split by heads, MoE by experts (see models/moe.py), the
    embedding replicated, and the unembedding only on rank 0, the one rank that computes logits."""

    def __init__(self, config: GptOssConfig, packed_experts: bool = False, tp: TensorParallel = SINGLE) -> None:
        super().__init__()
        self.config = config
        self.tp = tp
        self.embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(GptOssBlock(config, i, packed_experts, tp) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if tp.is_first:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary = YarnRotary(
            config.head_dim,
            config.rope_theta,
            config.rope_factor,
            config.rope_original_context,
            config.rope_beta_fast,
            config.rope_beta_slow,
            config.rope_truncate,
        )

    @property
    def max_context(self) -> int:
        return self.config.max_position_embeddings

    @property
    def capabilities(self) -> Capabilities:
        """Decode steps are captured only with static routing: otherwise the MoE reads each step's expert counts
        on the host. Every forward stops between layers when its ``interrupt`` says so."""
        moes = self.moes
        return Capabilities(
            captures_cuda_graphs=all(moe.static_shapes for moe in moes),
            interruptible=True,
            packed_experts=moes[0].experts.packed,
        )

    @property
    def moes(self) -> list[MoE]:
        return [cast(GptOssBlock, layer).moe for layer in self.layers]

    def use_static_routing(self) -> None:
        """Route and group the MoE's tokens on the device, every shape fixed by the token count (models/moe.py),
        so a decode step can be captured or compiled whole. Not the CPU default: the host-sized groups are faster."""
        if not all(moe.experts.runs_static for moe in self.moes):
            raise ValueError("static routing needs float experts (bfloat16 off the CPU) or, packed MXFP4 ones, "
                             "float32 on CPU")
        for moe in self.moes:
            moe.static_shapes = True

    def kv_cache_spec(self) -> KVCacheSpec:
        """With the sliding layers' windows, so a grouped pool can free their blocks behind the window (split
        over ranks too: a tensor-parallel step sends every group's tables, server/engine/step_channel.py)."""
        c = self.config
        windows = tuple(c.sliding_window if s else None for s in c.sliding_layers)
        return KVCacheSpec(c.num_layers, c.num_kv_heads // self.tp.world_size, c.head_dim, windows)

    def forward(self, batch: ForwardBatch, cache: PagedKVCache, interrupt: Interrupt | None = None) -> Tensor:
        """Final hidden states of every token; raises ForwardInterrupted if ``interrupt`` fires between layers."""
        if len(batch.views) != cache.num_groups:
            raise ValueError(
                f"the batch has block tables for {len(batch.views)} KV groups, the pool {cache.num_groups}")
        x = self.embedding(batch.input_ids)
        cos, sin = self.rotary.cos_sin(batch.positions, x.dtype)
        for index, layer in enumerate(self.layers):
            check_interrupt(interrupt)
            x = layer(x, cos, sin, batch.view(cache.group_of(index)), cache.layer(index))
        return self.norm(x)

    def compute_logits(self, hidden: Tensor) -> Tensor:
        return self.lm_head(hidden).float()

    @property
    def unembedding(self) -> Tensor | None:
        """The matrix the logits multiply by; None on the ranks that compute no logits (all but rank 0)."""
        return self.lm_head.weight if self.tp.is_first else None


def load_gpt_oss(
    model_dir: Path,
    dtype: torch.dtype,
    device: torch.device | str,
    keep_experts_packed: bool = False,
    tp: TensorParallel = SINGLE,
) -> GptOss:
    """Load the HF layout or the original one (a folder whose config.json has the reference's key names).

    ``keep_experts_packed`` keeps MXFP4 experts as uint8 blocks and scales, dequantizing an expert each time
    a forward runs it (see models/mxfp4.py for the memory each mode needs); float experts stay float.
    A tensor-parallel rank reads only its slices of the split weights.
    """
    raw_config = read_json(model_dir / "config.json")
    original = is_original_gpt_oss_config(raw_config)
    config = GptOssConfig.from_original(raw_config) if original else GptOssConfig.from_hf(raw_config)
    checkpoint = Checkpoint(model_dir)
    packed = keep_experts_packed and stores_mxfp4(checkpoint, original)
    with torch.device("meta"):
        model = GptOss(config, packed_experts=packed, tp=tp)
    shapes = {name: tuple(param.shape) for name, param in model.named_parameters()}
    state = read_state(checkpoint, config, original, shapes, dtype, torch.device(device), tp)
    model.load_state_dict(state, assign=True, strict=True)
    return model.eval().requires_grad_(False)
