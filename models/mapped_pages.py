"""The pages of a memory-mapped checkpoint: those no tensor of the loaded model views leave the process, and
those of the embedding tables are read ahead.

safetensors maps each shard whole, and a tensor kept as stored (MXFP4 experts, a bf16 embedding) is a view of
that mapping, so the mapping lives as long as the model. Tensors that were read and then converted (the bf16
linears' packed layout, the fused qkv, anything widened) were faulted in while loading and stay resident in
the mapping, counted in the process's RSS, though nothing reads them again: on the gpt-oss-20b widths that is
the 1.1 GB unembedding and the attention projections (bench/NOTES.md). ``madvise(MADV_DONTNEED)`` on the pages
outside every live view drops them; they are the file's own clean pages, so a later touch would read the file.
Linux only; elsewhere (no /proc/self/maps) nothing is done.

The views that decode steps read whole (MXFP4 experts kept packed) do not stay views: models/huge_pages.py
copies them onto huge pages at load. Embedding tables stay views of the file: a token reads one row of them.
Those rows are read ahead into the page cache at load (``MADV_WILLNEED``, as llama.cpp does with its whole
GGUF), which maps nothing into the process: without it, each new token of a server started on a cold page
cache read its row from disk during its decode step (~10 ms a step on gpt-oss-20b, bench/NOTES.md, session 14).
"""

from __future__ import annotations

import ctypes
import logging
import mmap
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

log = logging.getLogger("gptserve.models")

MADV_WILLNEED = 3
MADV_DONTNEED = 4
PAGE = mmap.PAGESIZE
# One MADV_WILLNEED reads ahead only part of a long range (a 25 MB table ended 65% cached); in calls of 2 MiB
# the whole of it is read
READ_AHEAD_CHUNK = 2 << 20


class FileMapping(NamedTuple):
    """One mapping of a checkpoint file: [start, end) addresses showing ``path`` from byte ``offset`` on."""

    start: int
    end: int
    path: str
    offset: int


def file_mappings(directory: Path) -> list[FileMapping]:
    """This process's mappings of ``*.safetensors`` files in ``directory``."""
    prefix = str(directory.resolve()) + "/"
    found = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                path = fields[5].strip() if len(fields) == 6 else ""
                if path.startswith(prefix) and path.endswith(".safetensors"):
                    start, end = (int(address, 16) for address in fields[0].split("-"))
                    found.append(FileMapping(start, end, path, int(fields[2], 16)))
    except OSError:
        return []
    return found


def module_tensors(model: nn.Module, recurse: bool = True) -> Iterator[torch.Tensor]:
    """Every tensor the model holds (or, without ``recurse``, the module itself): parameters, buffers, and
    tensors kept as plain attributes."""
    for module in model.modules() if recurse else [model]:
        yield from module.parameters(recurse=False)
        yield from module.buffers(recurse=False)
        yield from (value for value in vars(module).values() if isinstance(value, torch.Tensor))


def byte_extent(tensor: torch.Tensor) -> tuple[int, int] | None:
    """[first, last + 1) bytes of memory the tensor's elements occupy (strides may leave gaps inside; torch has
    no negative strides); None for what cannot view a file (oneDNN's blocked weights own their memory)."""
    if tensor.numel() == 0 or tensor.device.type != "cpu" or tensor.layout != torch.strided:
        return None
    span = 1 + sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()))
    return tensor.data_ptr(), tensor.data_ptr() + span * tensor.element_size()


def unviewed_ranges(mapping: tuple[int, int], views: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """The whole pages of ``mapping`` that no view touches (a page shared with a view is kept)."""
    start, end = mapping
    kept = sorted((max(a, start) // PAGE * PAGE, -(-min(b, end) // PAGE) * PAGE)
                  for a, b in views if a < end and b > start)
    free, cursor = [], start
    for a, b in kept:
        if a > cursor:
            free.append((cursor, a))
        cursor = max(cursor, b)
    if cursor < end:
        free.append((cursor, end))
    return free


def libc_madvise() -> Callable[[int, int, int], int]:
    """The C library's ``madvise(addr, length, advice)``, typed; errno readable with ``ctypes.get_errno()``."""
    madvise = ctypes.CDLL(None, use_errno=True).madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return madvise


def release_unviewed_pages(model: nn.Module, directory: Path) -> int:
    """Drop the pages of ``directory``'s mapped checkpoint files that ``model`` does not view; bytes released
    (an upper bound: pages never faulted in count too)."""
    mappings = file_mappings(directory)
    if not mappings:
        return 0
    views = [extent for tensor in module_tensors(model) if (extent := byte_extent(tensor)) is not None]
    madvise = libc_madvise()
    released = 0
    for mapping in mappings:
        for start, end in unviewed_ranges((mapping.start, mapping.end), views):
            if madvise(start, end - start, MADV_DONTNEED) == 0:
                released += end - start
            else:
                log.debug("madvise failed with errno %d", ctypes.get_errno())
    return released


def mapping_viewed(tensor: torch.Tensor, mappings: list[FileMapping]) -> FileMapping | None:
    """The mapping whose memory ``tensor`` views, if any."""
    extent = byte_extent(tensor)
    return next((m for m in mappings if extent is not None and m.start <= extent[0] < m.end), None)


def read_ahead_views(tensors: Iterable[torch.Tensor], directory: Path) -> int:
    """Ask the kernel to read the file pages that ``tensors`` view in ``directory``'s mapped checkpoint into the
    page cache (not into this process); bytes asked for."""
    mappings = file_mappings(directory)
    madvise = libc_madvise()
    asked = 0
    for tensor in tensors:
        extent = byte_extent(tensor)
        if extent is None or mapping_viewed(tensor, mappings) is None:
            continue
        start, end = extent[0] // PAGE * PAGE, -(-extent[1] // PAGE) * PAGE
        for chunk in range(start, end, READ_AHEAD_CHUNK):
            length = min(READ_AHEAD_CHUNK, end - chunk)
            if madvise(chunk, length, MADV_WILLNEED) == 0:
                asked += length
    return asked
