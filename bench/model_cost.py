"""Bytes and FLOPs a GPT-2-style decoder spends per token, from its shapes: the roofline side of the ceilings."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class DecoderShape:
    n_layer: int
    d_model: int
    d_ff: int
    vocab_size: int
    n_positions: int

    @property
    def layer_matmul_params(self) -> int:
        """qkv, attention output, MLP up and down projections (weights only)."""
        d = self.d_model
        return d * 3 * d + d * d + 2 * d * self.d_ff

    @property
    def params(self) -> int:
        d = self.d_model
        layer = self.layer_matmul_params + 3 * d + d + self.d_ff + d + 4 * d  # + biases and two layer norms
        return self.n_layer * layer + (self.vocab_size + self.n_positions) * d + 2 * d

    @property
    def lm_head_params(self) -> int:
        return self.vocab_size * self.d_model

    def weight_bytes_per_step(self, bytes_per_param: int = 4) -> int:
        """Weights one decode step must stream from memory: every matmul and the (tied) LM head.

        Embedding lookups touch one row per token, so they are left out.
        """
        return (self.n_layer * self.layer_matmul_params + self.lm_head_params) * bytes_per_param

    def attention_flops(self, context: int) -> int:
        """QK^T and attention-weighted V for one query token over ``context`` keys, all layers."""
        return 4 * self.n_layer * self.d_model * context

    def flops_per_token(self, context: int, logits: bool = True) -> int:
        matmul = self.n_layer * self.layer_matmul_params + (self.lm_head_params if logits else 0)
        return 2 * matmul + self.attention_flops(context)

    def request_flops(self, prompt_len: int, output_len: int) -> int:
        """Prefill (logits only for its last token, which yields output token 1) plus the other output tokens."""
        prefill = sum(self.flops_per_token(i + 1, logits=False) for i in range(prompt_len))
        decode = sum(self.flops_per_token(prompt_len + k) for k in range(1, output_len))
        return prefill + self.lm_head_params * 2 + decode


GPT2_124M = DecoderShape(n_layer=12, d_model=768, d_ff=3072, vocab_size=50257, n_positions=1024)
