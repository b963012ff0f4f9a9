"""A tensor-parallel worker rank (1..N-1): load this rank's shard, then run every step rank 0 sends.

Workers never sample and never compute logits: they only take part in each forward's collectives, so the
shard's contribution reaches rank 0 through the all_reduces. A worker exits when rank 0 says stop, or when
a collective fails (rank 0 gone), and then its non-zero exit code is what rank 0's watchdog sees.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from models.checkpoint import read_json
from models.forward_batch import ForwardBatch
from models.kv_cache import PagedKVCache, kv_cache_dtype
from models.loader import detect_family, load_weights, resolve_dtype
from models.servable import ServableModel
from server.engine.fault_injection import hang_on_poison
from server.engine.host_memory import keep_freed_memory_in_heap
from server.engine.step_channel import CacheGeometry, StepChannel
from server.engine.tp_group import JOIN_TIMEOUT, RankContext, ShardSpec, join

log = logging.getLogger("gptserve.tp")


def load_shard(spec: ShardSpec, ctx: RankContext) -> tuple[ServableModel, torch.dtype]:
    model_dir = Path(spec.model_dir)
    dtype = resolve_dtype(spec.load.dtype, ctx.device)
    family = detect_family(read_json(model_dir / "config.json"))
    return load_weights(model_dir, family, dtype, ctx.device, spec.load.keep_experts_packed, ctx.tp), dtype


def serve_steps(model: ServableModel, cache_dtype: torch.dtype, ctx: RankContext) -> None:
    """Run what rank 0 sends until it says stop; ``cache_dtype`` is the KV pool's, as rank 0's."""
    channel = StepChannel(ctx)
    cache: PagedKVCache | None = None
    with torch.inference_mode():
        while True:
            message = channel.receive(cache.block_size if cache else 0, cache.num_groups if cache else 1)
            if message is None:
                return
            if isinstance(message, CacheGeometry):
                cache = None  # free the old pool before allocating the new one
                cache = PagedKVCache(model.kv_cache_spec(), message.num_blocks, message.block_size, cache_dtype,
                                     ctx.device, message.grouped)
                channel.setup_done()
            elif isinstance(message, ForwardBatch) and cache is not None:
                hang_on_poison(message)
                model(message, cache)


def run_worker(rank: int, world_size: int, spec: ShardSpec, store: dist.Store | None, local_rank: int) -> None:
    """A worker's whole life; ``store`` is None under torchrun, which provides the rendezvous."""
    from server.logging_setup import configure_logging

    keep_freed_memory_in_heap()  # its own interpreter: glibc's defaults would page-fault every step's buffers

    configure_logging(spec.log_level)
    try:
        ctx = join(rank, world_size, spec, local_rank, store)
        model, dtype = load_shard(spec, ctx)
        dist.barrier(group=ctx.control)  # every shard loaded
        log.info("tensor-parallel rank %d ready", rank, extra={"rank": rank, "pid": os.getpid()})
        serve_steps(model, kv_cache_dtype(spec.engine.kv_cache_dtype, dtype), ctx)
        dist.destroy_process_group()
    except Exception:
        log.exception("tensor-parallel rank %d failed", rank, extra={"rank": rank, "pid": os.getpid()})
        sys.exit(1)
    log.info("tensor-parallel rank %d stopped", rank, extra={"rank": rank})


def spawned_worker(rank: int, world_size: int, spec: ShardSpec, store_host: str, store_port: int) -> None:
    """Entry point of a rank spawned by the front end on this machine (one GPU each: cuda:rank)."""
    store = dist.TCPStore(store_host, store_port, world_size, is_master=False, timeout=JOIN_TIMEOUT)
    run_worker(rank, world_size, spec, store, local_rank=rank)
