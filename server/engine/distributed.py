"""The engine core as tensor-parallel rank 0: it starts the other ranks, sends them every step, and watches them.

The scheduler, the block manager and the sampler live only here (the engine-core process, core_process).
Rank 0 also holds a shard: ``ShardedModel`` stands in for the model the engine runs, and before each forward
broadcasts the step's batch (see step_channel), so every rank runs the same forward on its own shard and the
all_reduces inside the models combine them. Only rank 0 computes logits and samples, so no sampler state
(seeds, generators) needs to agree across ranks.

Failures never hang the server: a spawned rank that exits is seen at once by the watchdog (its process
sentinel), and a rank that hangs mid-step fails the step's collectives within --tp-step-timeout. Either way the
engine is failed: /health answers 503, every in-flight and new request gets 503, and the log names the rank.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import replace
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor

from models.forward_batch import ForwardBatch, Interrupt
from models.kv_cache import KVCacheSpec, PagedKVCache
from models.loader import LoadedModel, load_model
from models.servable import Capabilities, ServableModel
from server.config import ServerConfig
from server.engine.step_channel import CacheGeometry, StepChannel
from server.engine.tp_group import JOIN_TIMEOUT, ShardSpec, join, launched_by_torchrun
from server.engine.tp_worker import run_worker, spawned_worker

log = logging.getLogger("gptserve.tp")

STOP_WAIT_S = 10.0  # how long stopped workers get to exit before they are terminated


class WorkerWatchdog:
    """Waits on the spawned ranks' process sentinels: the first to exit unasked is reported at once."""

    def __init__(self, processes: dict[int, BaseProcess]) -> None:
        self.processes = processes
        self.stopping = False

    def start(self, on_death: Callable[[str], None]) -> None:
        threading.Thread(target=self._watch, args=(on_death,), name="tp-watchdog", daemon=True).start()

    def _watch(self, on_death: Callable[[str], None]) -> None:
        rank_of = {process.sentinel: rank for rank, process in self.processes.items()}
        ready = wait(list(rank_of))
        rank = next(rank for sentinel, rank in rank_of.items() if sentinel in ready)
        if not self.stopping:
            process = self.processes[rank]
            process.join(1.0)
            on_death(f"tensor-parallel rank {rank} (pid {process.pid}) exited with code {process.exitcode}")

    def stop(self, wait_s: float = STOP_WAIT_S) -> None:
        self.stopping = True
        for process in self.processes.values():
            process.join(wait_s)
            if process.is_alive():
                process.kill()
                process.join()


class ShardedModel(ServableModel):
    """Rank 0's shard behind the contract the engine runs (models/servable.py)."""

    def __init__(self, model: ServableModel, channel: StepChannel, watchdog: WorkerWatchdog | None) -> None:
        self.model = model
        self.channel = channel
        self.watchdog = watchdog
        self.failure: str | None = None
        self._on_failure: Callable[[str], None] | None = None
        if watchdog is not None:
            watchdog.start(self.fail)

    @property
    def max_context(self) -> int:
        return self.model.max_context

    @property
    def capabilities(self) -> Capabilities:
        """The other ranks run each broadcast step from the batch, to the end: rank 0 can neither replay one
        alone nor give one up."""
        return replace(self.model.capabilities, captures_cuda_graphs=False, interruptible=False)

    def kv_cache_spec(self) -> KVCacheSpec:
        return self.model.kv_cache_spec()

    def compute_logits(self, hidden: Tensor) -> Tensor:
        return self.model.compute_logits(hidden)

    def attach(self, cache: PagedKVCache, on_failure: Callable[[str], None]) -> None:
        """Every rank allocates its KV shard like ``cache``; ``on_failure`` (any thread) fails the engine."""
        if self.failure is not None:
            raise RuntimeError(self.failure)
        self._on_failure = on_failure
        self.channel.send_setup(CacheGeometry(cache.num_blocks, cache.block_size, cache.grouped))

    def __call__(self, batch: ForwardBatch, cache: PagedKVCache, interrupt: Interrupt | None = None) -> Tensor:
        """Broadcast the step and run rank 0's shard; ``interrupt`` must be None (``interruptible`` is False)."""
        if interrupt is not None:
            raise ValueError("a tensor-parallel step cannot be given up by rank 0 alone")
        if self.failure is not None:
            raise RuntimeError(self.failure)
        try:
            self.channel.send_step(batch)
            return self.model(batch, cache)
        except Exception as exc:  # the ranks are out of step now: nothing more can run
            self.fail(f"tensor-parallel step failed: {exc}")
            raise

    def fail(self, reason: str) -> None:
        if self.failure is None:
            self.failure = reason
            log.error("tensor parallelism failed: %s", reason)
            if self._on_failure is not None:
                self._on_failure(reason)

    def stop(self) -> None:
        """Tell every rank to exit (after the engine thread has stopped), then make sure they have; after a
        failure the ranks cannot be told (they are out of step, or hung), so they are killed at once."""
        if self.watchdog is not None:
            self.watchdog.stopping = True
        if self.failure is None:
            self.channel.send_stop()
        if self.watchdog is not None:
            self.watchdog.stop(STOP_WAIT_S if self.failure is None else 0.0)
        if self.failure is None:
            dist.destroy_process_group()


def launch(model_dir: Path, config: ServerConfig) -> LoadedModel:
    """Start (or, under torchrun, join) the ranks, load rank 0's shard here, and wait for every shard."""
    world_size = config.parallel.tensor_parallel_size
    spec = shard_spec(model_dir, config)
    watchdog = None
    if launched_by_torchrun():
        if int(os.environ["WORLD_SIZE"]) != world_size:
            raise ValueError(
                f"torchrun started {os.environ['WORLD_SIZE']} ranks, --tensor-parallel-size is {world_size}")
        ctx = join(0, world_size, spec, int(os.environ.get("LOCAL_RANK", 0)), store=None)
    else:
        store = dist.TCPStore("127.0.0.1", 0, world_size, is_master=True, timeout=JOIN_TIMEOUT, wait_for_workers=False)
        spawn = mp.get_context("spawn")
        processes: dict[int, BaseProcess] = {}
        for rank in range(1, world_size):
            args = (rank, world_size, spec, "127.0.0.1", store.port)
            processes[rank] = spawn.Process(target=spawned_worker, args=args, name=f"gptserve-tp{rank}", daemon=True)
            processes[rank].start()
            log.info("started tensor-parallel rank %d", rank, extra={"rank": rank, "pid": processes[rank].pid})
        watchdog = WorkerWatchdog(processes)
        ctx = join(0, world_size, spec, 0, store)
    device = str(ctx.device) if config.load.device != "cpu" else "cpu"
    loaded = load_model(model_dir, config.load.dtype, device, config.load.keep_experts_packed, tp=ctx.tp,
                        tokenizer=config.load.tokenizer)
    dist.barrier(group=ctx.control)  # every shard loaded
    loaded.model = ShardedModel(loaded.model, StepChannel(ctx), watchdog)
    log.info("tensor parallel over %d ranks", world_size, extra={"backend": dist.get_backend()})
    return loaded


def shard_spec(model_dir: Path, config: ServerConfig) -> ShardSpec:
    return ShardSpec(str(model_dir), config.load, config.engine, config.parallel, config.log_level)


def run_torchrun_rank(model_dir: Path, config: ServerConfig) -> int:
    """A rank > 0 started by torchrun runs the same command line as rank 0 and becomes a worker."""
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if world_size != config.parallel.tensor_parallel_size:
        raise ValueError(
            f"torchrun started {world_size} ranks, --tensor-parallel-size is {config.parallel.tensor_parallel_size}")
    run_worker(rank, world_size, shard_spec(model_dir, config), None, int(os.environ.get("LOCAL_RANK", 0)))
    return 0
