"""Sharded forwards without the server: two gloo ranks (this process is rank 0) give the unsharded logits.

The tiny GPT-OSS here has 5 experts, which 2 ranks cannot divide, so the MoE takes the fallback split of
every expert's intermediate dimension (the expert split is covered through the API test).
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from models.checkpoint import Checkpoint, CheckpointError
from models.forward_batch import ForwardBatch
from models.gpt_oss import GptOss, GptOssConfig, load_gpt_oss
from models.kv_cache import PagedKVCache
from models.moe import splits_by_experts
from models.parallel import TensorParallel
from models.testing.gpt_oss_checkpoint import TINY_CONFIG, hf_config_json, write_tiny_gpt_oss

WORLD = 2
PROMPTS = [[5, 9, 200, 17, 3, 88, 1000, 4], [42, 7, 7], [123456, 77, 3, 9, 11]]
BLOCK = 4


def two_steps(model: GptOss) -> list[torch.Tensor]:
    """Prefill three prompts, then decode one token each; rank 0 returns both steps' logits."""
    tables = [[3 * i, 3 * i + 1, 3 * i + 2] for i in range(len(PROMPTS))]
    cache = PagedKVCache(model.kv_cache_spec(), 3 * len(PROMPTS), BLOCK)
    prefill = ForwardBatch.build(PROMPTS, [0] * len(PROMPTS), tables, BLOCK)
    decode = ForwardBatch.build([[1], [2], [3]], [len(p) for p in PROMPTS], tables, BLOCK)
    logits = []
    for batch in (prefill, decode):
        hidden = model(batch, cache)
        if model.tp.is_first:
            logits.append(model.compute_logits(hidden))
    return logits


@torch.inference_mode()
def run_rank(rank: int, port: int, model_dir: Path) -> list[torch.Tensor]:
    store = dist.TCPStore("127.0.0.1", port, WORLD, is_master=rank == 0, wait_for_workers=False)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    try:
        return two_steps(load_gpt_oss(model_dir, torch.float32, "cpu", tp=TensorParallel(rank, WORLD)))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def five_experts_dir(tmp_path_factory) -> Path:
    return write_tiny_gpt_oss(tmp_path_factory.mktemp("tp") / "gpt-oss", num_local_experts=5, sliding_window=4)


def test_two_ranks_splitting_expert_intermediate_dims_give_the_unsharded_logits(five_experts_dir):
    assert not splits_by_experts(5, TensorParallel(0, WORLD))
    from bench.server_process import free_port

    port = free_port()
    worker = mp.get_context("spawn").Process(target=run_rank, args=(1, port, five_experts_dir))
    worker.start()
    try:
        sharded = run_rank(0, port, five_experts_dir)
    finally:
        worker.join(60)
    assert worker.exitcode == 0
    with torch.inference_mode():
        expected = two_steps(load_gpt_oss(five_experts_dir, torch.float32, "cpu"))
    for got, want in zip(sharded, expected):
        assert torch.equal(got.argmax(-1), want.argmax(-1))
        torch.testing.assert_close(torch.log_softmax(got, -1), torch.log_softmax(want, -1), atol=1e-4, rtol=0)


def test_kv_heads_that_ranks_cannot_divide_are_rejected_with_the_reason():
    config = GptOssConfig.from_hf(hf_config_json(TINY_CONFIG))  # 2 KV heads
    refused = pytest.raises(CheckpointError, match="num_key_value_heads=2 .* --tensor-parallel-size 4")
    with torch.device("meta"), refused:
        GptOss(config, tp=TensorParallel(0, 4))


def test_a_rank_reads_only_its_slices_of_a_tensor(tiny_gpt2_dir):
    checkpoint = Checkpoint(tiny_gpt2_dir)
    name = "transformer.h.0.attn.c_attn.weight"  # [64, 192]: q, k, v side by side
    full = checkpoint.get(name)
    ranges = TensorParallel(1, 4).ranges(64, 64, 64)
    assert ranges == [(16, 32), (80, 96), (144, 160)]
    shard = checkpoint.get_slices(name, 1, ranges, shape=(64, 192))
    assert torch.equal(shard, torch.cat([full[:, a:b] for a, b in ranges], 1))
