"""``python -m bench.decode_attention_kernel``: the paged decode attention op's paths side by side.

Times ``torch.ops.gptserve.paged_decode_attention`` with each ISA path this CPU runs, alternated in one process,
as thread CPU time (so a shared machine's preemption does not count): a batch of S sequences of ``ctx`` keys
each, H query / KVH key-value heads of 64 dims, from a float32 and a bfloat16 pool whose blocks lie scattered.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from models.cpu_kernels import cpu_kernels_loaded

BLOCK = 16
SHAPES = [(1, 256, 12, 12), (1, 1024, 12, 12), (16, 256, 12, 12), (4, 512, 64, 8)]  # S, ctx, H, KVH


def thread_us(S: int, ctx: int, H: int, KVH: int, dtype: torch.dtype, isa: str, repeats: int) -> float:
    """Median thread CPU microseconds of one call, over ``repeats`` timings of 50 calls."""
    blocks_per_seq = -(-ctx // BLOCK)
    num_blocks = S * blocks_per_seq + 8
    gen = torch.Generator().manual_seed(0)
    keys, values = (torch.randn(num_blocks * BLOCK, KVH, 64, generator=gen).to(dtype) for _ in range(2))
    blocks = torch.randperm(num_blocks, generator=gen)[: S * blocks_per_seq].view(S, -1).contiguous()
    lens = torch.full((S,), ctx, dtype=torch.long)
    q, sinks = torch.randn(S, H, 64, generator=gen), torch.randn(H, generator=gen)

    def call() -> torch.Tensor:
        return torch.ops.gptserve.paged_decode_attention(q, keys, values, blocks, lens, BLOCK, 0, 0.125, sinks, isa)

    for _ in range(20):
        call()
    times = []
    for _ in range(repeats):
        start = time.thread_time()
        for _ in range(50):
            call()
        times.append((time.thread_time() - start) / 50)
    return 1e6 * statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.decode_attention_kernel",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--isas", nargs="+", default=["avx2", "avx512"])
    args = parser.parse_args(argv)
    assert cpu_kernels_loaded(), "the C++ kernels did not build"
    torch.set_num_threads(args.threads)
    for S, ctx, H, KVH in SHAPES:
        for dtype in (torch.bfloat16, torch.float32):
            rounds: dict[str, list[float]] = {isa: [] for isa in args.isas}
            for _ in range(2):  # alternated, twice
                for isa in args.isas:
                    rounds[isa].append(thread_us(S, ctx, H, KVH, dtype, isa, args.repeats))
            cells = "  ".join(f"{isa} {min(us):7.1f} us" for isa, us in rounds.items())
            print(f"S={S:>2} ctx={ctx:>4} H={H}/{KVH} {str(dtype)[6:]:>8} pool: {cells}", flush=True)


if __name__ == "__main__":
    main()
