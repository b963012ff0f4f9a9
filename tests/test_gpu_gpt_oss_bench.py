"""The byte count behind bench/gpu_gpt_oss.py's batch-1 limit, against one worked out from the config by hand."""

from __future__ import annotations

import torch

from bench.gpu_gpt_oss import decode_bytes_per_token
from models.gpt_oss import load_gpt_oss
from models.testing.gpt_oss_checkpoint import TINY_CONFIG, write_tiny_gpt_oss


def test_a_decode_step_reads_every_weight_but_the_embedding_and_k_of_e_experts(tmp_path):
    model = load_gpt_oss(write_tiny_gpt_oss(tmp_path, layout="hf"), torch.float32, torch.device("cpu"))
    c = TINY_CONFIG
    hidden, inter = c["hidden_size"], c["intermediate_size"]
    experts, k = c["num_local_experts"], c["num_experts_per_tok"]
    q_width, kv_width = c["num_attention_heads"] * c["head_dim"], c["num_key_value_heads"] * c["head_dim"]
    attention = hidden * (q_width + 2 * kv_width) + q_width + 2 * kv_width + q_width * hidden + hidden
    attention += c["num_attention_heads"]  # sinks
    router = experts * hidden + experts
    expert = 2 * inter * hidden + 2 * inter + hidden * inter + hidden  # gate_up and down, with their biases
    layer = attention + 2 * hidden + router + k * expert  # two norms; k of the E experts
    values = c["num_hidden_layers"] * layer + hidden + c["vocab_size"] * hidden  # final norm, unembedding
    assert decode_bytes_per_token(model, k / experts) == 4 * values
