"""``python -m bench.gpu_paged_attention``: CUDA paged attention, the Triton kernel against gather + SDPA.

One layer's ``models.attention.paged_attention`` for a batch of S decode tokens with ``ctx`` keys each, and
for one prefill chunk of P queries ending at ``ctx``, bf16 queries over a bf16 pool whose blocks lie scattered,
GPT-2's heads (12/12) and GPT-OSS's (64/8, with sinks): once read in place by models/triton_paged_attention.py,
once gathered into padded copies for SDPA (the path before it). Alternated, timed with CUDA events; also
prints the kernel's KV read rate for decode and its TFLOP/s for prefill. Needs a GPU; run by bench/cuda_run.sh.
"""

from __future__ import annotations

import argparse
import random
import statistics
from collections.abc import Callable

import torch

import models.attention as attention
from models.forward_batch import ForwardBatch

BLOCK = 16
DECODE_SHAPES = [(1, 512), (16, 512), (64, 512), (64, 2048)]  # S, ctx
PREFILL_SHAPES = [(512, 512), (512, 2048), (2048, 2048)]  # P, ctx
LAYOUTS = [(12, 12, False), (64, 8, True)]  # H, KVH, sinks


def microseconds(call, repeats: int) -> float:
    """Median of ``repeats`` timings of 20 calls, after a warm-up (Triton compiles on its first call)."""
    for _ in range(5):
        call()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            call()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / 20)
    return statistics.median(times)


def layer_calls(heads: int, kv_heads: int, with_sinks: bool, query_lens: list[int], ctx: int,
                device: torch.device) -> dict[str, Callable[[], torch.Tensor]]:
    """One layer's attention over sequences with ``query_lens`` queries each, the last at position ctx - 1: a
    call for each path (a prefill chunk's Triton call leaves out the KV write the other path does first)."""
    seqs, per_seq = len(query_lens), -(-ctx // BLOCK)
    pool_blocks = list(range(seqs * per_seq + 1))
    random.Random(0).shuffle(pool_blocks)
    tables = [pool_blocks[i * per_seq : (i + 1) * per_seq] for i in range(seqs)]
    kv = ForwardBatch.build([[1] * n for n in query_lens], [ctx - n for n in query_lens], tables, BLOCK,
                            device).view(0)
    shape = (len(pool_blocks) * BLOCK, kv_heads, 64)
    cache = (torch.randn(shape, device=device, dtype=torch.bfloat16),
             torch.randn(shape, device=device, dtype=torch.bfloat16))
    tokens = sum(query_lens)
    q = torch.randn(tokens, heads, 64, device=device, dtype=torch.bfloat16)
    k, v = (torch.randn(tokens, kv_heads, 64, device=device, dtype=torch.bfloat16) for _ in range(2))
    sinks = torch.randn(heads, device=device) if with_sinks else None
    for pool, new in zip(cache, (k, v)):  # what paged_attention writes first: both paths then read the same
        pool.index_copy_(0, kv.slot_mapping, new)
    def routed() -> torch.Tensor:
        return attention.paged_attention(q, k, v, cache, kv, sinks=sinks)

    def chunk_through_kernel() -> torch.Tensor:  # prefill chunks are not routed to the kernel yet
        return attention.triton_attention(q, *cache, kv.groups[0], None, sinks)

    return {"triton": chunk_through_kernel if max(query_lens) > 1 else routed, "gather+sdpa": routed}


def alternated(paths: dict[str, Callable[[], torch.Tensor]], repeats: int) -> dict[str, float]:
    """Best of two alternated medians for each path."""
    timings: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(2):
        for name, call in paths.items():
            attention.triton_attention_applies = lambda _device, on=name == "triton": on  # type: ignore[misc]
            timings[name].append(microseconds(call, repeats))
    return {name: min(times) for name, times in timings.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_paged_attention", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=11)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure")
        return 1
    cuda = torch.device("cuda")
    for heads, kv_heads, with_sinks in LAYOUTS:
        for seqs, ctx in DECODE_SHAPES:
            best = alternated(layer_calls(heads, kv_heads, with_sinks, [1] * seqs, ctx, cuda), args.repeats)
            kv_bytes = 2 * seqs * ctx * kv_heads * 64 * 2
            print(f"H={heads}/{kv_heads} decode S={seqs:>2} ctx={ctx:>4}: triton {best['triton']:8.1f} us "
                  f"({kv_bytes / best['triton'] / 1e3:6.1f} GB/s of KV), gather+sdpa {best['gather+sdpa']:8.1f} us",
                  flush=True)
        for chunk, ctx in PREFILL_SHAPES:
            best = alternated(layer_calls(heads, kv_heads, with_sinks, [chunk], ctx, cuda), args.repeats)
            causal_pairs = chunk * (ctx - chunk) + chunk * (chunk + 1) / 2
            flops = 4 * causal_pairs * heads * 64
            print(f"H={heads}/{kv_heads} prefill P={chunk:>4} ctx={ctx:>4}: triton {best['triton']:8.1f} us "
                  f"({flops / best['triton'] / 1e6:6.1f} TFLOP/s), gather+sdpa {best['gather+sdpa']:8.1f} us",
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
