"""Joining the tensor-parallel ranks: the process groups, their timeouts, and what every rank loads.

Two groups over the same ranks, besides the default group that only joins them (under JOIN_TIMEOUT, as ranks
arrive while still loading torch). The data group (NCCL on CUDA, gloo on CPU) carries each step's batch and the
models' all_reduces under a short timeout, so a rank that hangs mid-step fails the step within
``--tp-step-timeout`` instead of blocking the server forever. The control group (always gloo, CPU tensors)
carries only the small per-step header that idle workers wait on; it must not time out while the server is idle.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from models.parallel import TensorParallel
from server.config import EngineConfig, ModelLoadConfig, ParallelConfig

IDLE_TIMEOUT = timedelta(days=3650)  # workers wait for the next step as long as the server runs
JOIN_TIMEOUT = timedelta(seconds=120)  # every rank must reach the rendezvous within this


@dataclass(frozen=True, slots=True)
class ShardSpec:
    """What each rank needs to load its shard, given to every rank when it starts."""

    model_dir: str
    load: ModelLoadConfig  # with device cuda, rank r uses local GPU LOCAL_RANK (spawned: r)
    engine: EngineConfig  # its kv_cache_dtype: the dtype of each rank's share of the KV cache
    parallel: ParallelConfig  # its tp_step_timeout: longest wait for a peer inside one step's collectives
    log_level: str


@dataclass(frozen=True, slots=True)
class RankContext:
    tp: TensorParallel  # over the data group
    control: dist.ProcessGroup
    device: torch.device


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "MASTER_ADDR" in os.environ)


def rank_device(spec: ShardSpec, local_rank: int) -> torch.device:
    if spec.load.device == "cpu" or (spec.load.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def join(rank: int, world_size: int, spec: ShardSpec, local_rank: int, store: dist.Store | None) -> RankContext:
    """Join the process group: through ``store`` (ranks spawned here) or, with None, torchrun's environment."""
    device = rank_device(spec, local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    options = {"store": store} if store is not None else {"init_method": "env://"}
    # The rendezvous waits for ranks still loading torch; only the step collectives get the short timeout.
    dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=JOIN_TIMEOUT, **options)
    data = dist.new_group(backend=backend, timeout=timedelta(seconds=spec.parallel.tp_step_timeout))
    control = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
    return RankContext(TensorParallel(rank, world_size, data), control, device)
