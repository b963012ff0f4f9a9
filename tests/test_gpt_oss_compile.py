"""A GPT-OSS decode step with static routing is one graph: what a CUDA graph capture needs, proved on CPU.

``torch.compile(fullgraph=True)`` raises at the first graph break (a host read such as ``.tolist()``, an op
with no output shape for tracing), and a second step of the same batch bucket must reuse the first step's
graph. The eager backend keeps this cheap: only dynamo's tracing runs, no code is generated.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch._dynamo.testing import CompileCounter

from models.gpt_oss import GptOss, load_gpt_oss
from models.kv_cache import PagedKVCache
from models.testing.gpt_oss_checkpoint import write_tiny_gpt_oss
from server.engine.decode_graphs import DecodeGraphs

BLOCK_SIZE, NUM_BLOCKS = 4, 12  # block NUM_BLOCKS is the scratch block


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    return write_tiny_gpt_oss(tmp_path_factory.mktemp("gpt-oss"), layout="hf", sliding_window=4)


# bfloat16, float experts: the path CUDA takes (gathered keys + SDPA with sinks, torch's grouped GEMM);
# float32, packed experts: the CPU's C++ kernels (paged decode attention, MXFP4 grouped linear).
@pytest.fixture(scope="module", params=[("bfloat16", False), ("float32", True)], ids=["bf16-float", "fp32-packed"])
def model(request, checkpoint_dir) -> GptOss:
    dtype, packed = request.param
    model = load_gpt_oss(checkpoint_dir, getattr(torch, dtype), "cpu", keep_experts_packed=packed)
    model.use_static_routing()
    return model


def decode_chunks(contexts: list[int], seed: int) -> list[SimpleNamespace]:
    """One decode token per sequence, sequence i holding blocks 3i.. (what DecodeGraphs reads of a chunk)."""
    g = torch.Generator().manual_seed(seed)
    chunks = []
    for i, context in enumerate(contexts):
        tokens = torch.randint(0, 201088, (context + 1,), generator=g).tolist()
        tables = [[3 * i, 3 * i + 1, 3 * i + 2]]
        seq = SimpleNamespace(token_ids=tokens, num_computed_tokens=context, block_tables=tables)
        chunks.append(SimpleNamespace(seq=seq, num_tokens=1))
    return chunks


def test_decode_step_compiles_whole_and_steps_of_one_bucket_reuse_its_graph(model):
    torch._dynamo.reset()
    cache = PagedKVCache(model.kv_cache_spec(), NUM_BLOCKS + 1, BLOCK_SIZE)
    graphs = DecodeGraphs(model, cache, max_rows=4, max_blocks=4, scratch_block=NUM_BLOCKS)
    eager, counter = graphs._forward, CompileCounter()
    compiled = torch.compile(eager, fullgraph=True, backend=counter)
    # two steps in the (4 rows, 4 blocks) bucket: other tokens, contexts, and so other experts and windows
    for step, contexts in enumerate([[5, 9, 1], [6, 10, 2]]):
        chunks = decode_chunks(contexts, seed=step)
        graphs._forward = compiled
        logits = graphs.run(chunks).clone()
        graphs._forward = eager
        torch.testing.assert_close(logits, graphs.run(chunks))  # the same keys and values into the same slots
    assert counter.frame_count == 1, "the second step recompiled"


def test_graphs_are_captured_only_once_routing_is_static(checkpoint_dir):
    model = load_gpt_oss(checkpoint_dir, torch.float32, "cpu")
    assert not model.capabilities.captures_cuda_graphs, "the host-sized MoE reads expert counts every layer"
    model.use_static_routing()
    assert model.capabilities.captures_cuda_graphs
    packed_bf16 = load_gpt_oss(checkpoint_dir, torch.bfloat16, "cpu", keep_experts_packed=True)
    with pytest.raises(ValueError, match="packed MXFP4 ones, float32 on CPU"):
        packed_bf16.use_static_routing()
    assert not packed_bf16.capabilities.captures_cuda_graphs
