"""``python -m bench.swa_kv_capacity``: how many tokens the KV pool holds for the gpt-oss-20b shape, with the
sliding-window layers in their own KV group (server/engine/block_manager.py) and without.

No model runs: the pool is sized as the engine sizes it (bytes per token from models/kv_cache.py) and filled by
the real BlockManager, sequence after sequence, each prefilled in 512-token chunks and then decoded a token at a
time to its full length, until one more cannot be given its blocks.
"""

from __future__ import annotations

import argparse

import torch

from models.kv_cache import KVCacheSpec
from server.engine.block_manager import BlockManager
from server.engine.sampling_params import SamplingParams
from server.engine.sequence import Sequence

# openai/gpt-oss-20b: 24 layers, sliding window 128 on every even one, 8 KV heads of 64
SPEC_20B = KVCacheSpec(24, 8, 64, tuple(128 if i % 2 == 0 else None for i in range(24)))
CHUNK = 512


def grow(manager: BlockManager, seq: Sequence, prompt: int) -> bool:
    """Prefill ``prompt`` tokens in chunks, then decode to the sequence's length; False once blocks run out."""
    while seq.num_computed_tokens < seq.num_tokens:
        n = min(CHUNK, prompt - seq.num_computed_tokens) if seq.num_computed_tokens < prompt else 1
        if not seq.block_tables:
            if manager.admit(seq, n) == 0:
                return False
        elif manager.can_allocate(seq, n):
            manager.allocate(seq, n)
        else:
            return False
        seq.num_computed_tokens += n
    return True


def tokens_held(grouped: bool, memory_gib: float, prompt: int, length: int, block_size: int) -> tuple[int, int]:
    """(blocks in the pool, tokens of the sequences that fit whole)."""
    windows = SPEC_20B.group_windows if grouped else (None,)
    bytes_per_token = SPEC_20B.bytes_per_token(torch.bfloat16, grouped)
    num_blocks = int(memory_gib * 2**30) // bytes_per_token // block_size
    manager = BlockManager(num_blocks, block_size, enable_prefix_caching=False, windows=windows)
    held = 0
    while True:
        seq = Sequence(str(held), 0, list(range(held, held + length)), prompt, SamplingParams(max_tokens=1), 0.0)
        if not grow(manager, seq, prompt):
            return num_blocks, held
        held += length


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--memory-gib", type=float, default=16.0)
    parser.add_argument("--prompt", type=int, default=1024)
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096, 16384])
    parser.add_argument("--block-size", type=int, default=16)
    args = parser.parse_args()
    print(f"gpt-oss-20b KV in bf16, {args.memory_gib} GiB, block {args.block_size}, prompts of up to {args.prompt}")
    for length in args.lengths:
        prompt = min(args.prompt, length - 1)
        one = [tokens_held(g, args.memory_gib, prompt, length, args.block_size) for g in (False, True)]
        print(f"sequences of {length:6d}: one group {one[0][1]:8d} tokens ({one[0][0]} blocks), "
              f"full + sliding groups {one[1][1]:8d} tokens ({one[1][0]} blocks): x{one[1][1] / one[0][1]:.2f}")


if __name__ == "__main__":
    main()
