"""The one contract between the engine and a model (models/servable.py): what every servable model keeps, the
capabilities each declares, and the lifecycle the engine drives without asking which model it runs."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import Tensor

from models.forward_batch import ForwardBatch, Interrupt
from models.gpt2 import load_gpt2
from models.gpt_oss import load_gpt_oss
from models.kv_cache import KVCacheSpec, PagedKVCache
from models.loader import LoadedModel, load_model
from models.servable import Capabilities, ServableModel
from models.testing.gpt_oss_checkpoint import write_tiny_gpt_oss
from server.engine import core_messages as wire
from server.engine.distributed import ShardedModel
from server.engine.engine import EngineConfig, LLMEngine
from server.engine.step_channel import CacheGeometry, StepChannel
from tests.inproc_core import InprocCore

CPU = torch.device("cpu")


class RecordingChannel(StepChannel):
    """Stands in for the tensor-parallel channel (no process group): remembers what rank 0 would have sent."""

    def __init__(self) -> None:  # not the real channel's: that one needs a process group
        self.sent: list[object] = []

    def send_setup(self, geometry: CacheGeometry) -> None:
        self.sent.append(geometry)


class RecordingModel(ServableModel):
    """A servable model of no particular class that records the lifecycle calls the engine makes."""

    def __init__(self, inner: ServableModel) -> None:
        self.inner = inner
        self.calls: list[str] = []

    @property
    def max_context(self) -> int:
        return self.inner.max_context

    @property
    def capabilities(self) -> Capabilities:
        return self.inner.capabilities

    def kv_cache_spec(self) -> KVCacheSpec:
        return self.inner.kv_cache_spec()

    def __call__(self, batch: ForwardBatch, cache: PagedKVCache, interrupt: Interrupt | None = None) -> Tensor:
        return self.inner(batch, cache, interrupt)

    def compute_logits(self, hidden: Tensor) -> Tensor:
        return self.inner.compute_logits(hidden)

    def attach(self, cache: PagedKVCache, on_failure: Callable[[str], None]) -> None:
        self.calls.append("attach")

    def stop(self) -> None:
        self.calls.append("stop")


@pytest.fixture(scope="module")
def gpt_oss_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gpt_oss(tmp_path_factory.mktemp("contract") / "gpt-oss")


def test_both_families_and_the_sharded_executor_are_servable_models(tiny_gpt2_dir, gpt_oss_dir):
    gpt2 = load_gpt2(tiny_gpt2_dir, torch.float32, CPU)
    models = [gpt2, load_gpt_oss(gpt_oss_dir, torch.float32, CPU), ShardedModel(gpt2, RecordingChannel(), None)]
    assert all(isinstance(model, ServableModel) for model in models)
    assert isinstance(load_model(tiny_gpt2_dir, "float32", "cpu").model, ServableModel)


def test_each_model_declares_what_it_can_do_in_one_capabilities_record(tiny_gpt2_dir, gpt_oss_dir):
    gpt2 = load_gpt2(tiny_gpt2_dir, torch.float32, CPU)
    assert gpt2.capabilities == Capabilities(captures_cuda_graphs=True, interruptible=True, packed_experts=False)
    packed = load_gpt_oss(gpt_oss_dir, torch.float32, CPU, keep_experts_packed=True)
    assert packed.capabilities == Capabilities(captures_cuda_graphs=False, interruptible=True, packed_experts=True)
    packed.use_static_routing()
    assert packed.capabilities.captures_cuda_graphs
    sharded = ShardedModel(packed, RecordingChannel(), None)
    assert sharded.capabilities == Capabilities(captures_cuda_graphs=False, interruptible=False, packed_experts=True)


def test_a_single_process_model_needs_nothing_attached_or_stopped(tiny_gpt2_dir):
    model = load_gpt2(tiny_gpt2_dir, torch.float32, CPU)
    cache = PagedKVCache(model.kv_cache_spec(), 2, 4)
    model.attach(cache, on_failure=pytest.fail)
    model.stop()


def test_the_sharded_executor_has_every_rank_allocate_its_kv_when_attached(tiny_gpt2_dir):
    channel = RecordingChannel()
    sharded = ShardedModel(load_gpt2(tiny_gpt2_dir, torch.float32, CPU), channel, None)
    sharded.attach(PagedKVCache(sharded.kv_cache_spec(), 3, 4), on_failure=pytest.fail)
    assert channel.sent == [CacheGeometry(num_blocks=3, block_size=4, grouped=False)]


def test_the_engine_core_attaches_whatever_model_it_runs_at_start_and_stops_it_at_shutdown(tiny_gpt2_dir):
    loaded = load_model(tiny_gpt2_dir, "float32", "cpu")
    model = RecordingModel(loaded.model)
    recorded: LoadedModel = dataclasses.replace(loaded, model=model)
    inproc = InprocCore(LLMEngine(recorded, EngineConfig(kv_cache_tokens=64, block_size=8)))
    try:
        inproc.send(wire.Shutdown())
        inproc.core.run()  # attaches, reports Ready, takes the Shutdown, stops
        assert isinstance(inproc.receive(), wire.Ready)
    finally:
        inproc.close()
    assert model.calls == ["attach", "stop"]
