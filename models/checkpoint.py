"""Reading a checkpoint directory: config.json and single or sharded safetensors, memory-mapped.

Tensors are read one at a time through safetensors' mmap, converted to the target dtype and device, and
handed to the model, so loading never holds a second full copy of the weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: missing file, unknown model type, wrong tensor, bad config value."""


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"missing file: {path.name} not found in {path.parent}")
    with path.open() as f:
        return json.load(f)


def config_int(config: dict, key: str, low: int = 1, high: int = 1 << 24, default: int | None = None) -> int:
    """An integer config value (null or absent means ``default``), or a CheckpointError naming the key."""
    value = default if config.get(key) is None else config[key]
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise CheckpointError(f"config.json: {key}={value!r} is out of range (expected an integer in [{low}, {high}])")
    return value


def config_float(config: dict, key: str, low: float, high: float, default: float | None = None) -> float:
    value = default if config.get(key) is None else config[key]
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value <= high:
        raise CheckpointError(f"config.json: {key}={value!r} is out of range (expected a number in [{low}, {high}])")
    return float(value)


class Checkpoint:
    """The safetensors files of one directory: `model.safetensors`, an index of shards, or any `*.safetensors`."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        index = directory / "model.safetensors.index.json"
        if index.is_file():
            weight_map: dict[str, str] = read_json(index)["weight_map"]
            files = sorted(set(weight_map.values()))
            for name in files:
                if not (directory / name).is_file():
                    raise CheckpointError(f"missing file: shard {name} named by {index.name} not found in {directory}")
        elif (directory / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            files = sorted(p.name for p in directory.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"missing file: no model.safetensors (or shards) in {directory}")
        self._handles = {name: safe_open(directory / name, framework="pt") for name in files}
        self._file_of = {key: name for name, handle in self._handles.items() for key in handle.keys()}

    @property
    def names(self) -> set[str]:
        return set(self._file_of)

    def has(self, name: str) -> bool:
        return name in self._file_of

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def get(
        self,
        name: str,
        shape: tuple[int, ...] | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str = "cpu",
    ) -> Tensor:
        """One tensor, checked against the shape the config implies, in the requested dtype and device."""
        self._check_shape(name, shape)
        tensor = self._handle(name).get_tensor(name)
        return tensor.to(device=device, dtype=dtype or tensor.dtype)

    def get_slices(
        self,
        name: str,
        dim: int,
        ranges: list[tuple[int, int]],
        shape: tuple[int, ...] | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str = "cpu",
    ) -> Tensor:
        """The [start, stop) pieces of dimension ``dim`` of one tensor, concatenated; ``shape`` is the whole
        tensor's. Only those pieces are read from the file, so a tensor-parallel rank never holds the rest."""
        self._check_shape(name, shape)
        view = self._handle(name).get_slice(name)
        lead = (slice(None),) * dim
        parts = [view[(*lead, slice(start, stop))] for start, stop in ranges]
        tensor = parts[0] if len(parts) == 1 else torch.cat(parts, dim)
        return tensor.to(device=device, dtype=dtype or tensor.dtype)

    def _check_shape(self, name: str, shape: tuple[int, ...] | None) -> None:
        if shape is not None and self.shape(name) != tuple(shape):
            raise CheckpointError(
                f"tensor {name} has shape {list(self.shape(name))}, expected {list(shape)} from config.json")

    def _handle(self, name: str):
        if name not in self._file_of:
            raise CheckpointError(f"tensor {name} is missing from the checkpoint in {self.directory}")
        return self._handles[self._file_of[name]]
