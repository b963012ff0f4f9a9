"""Drop the resident pages of a memory-mapped checkpoint that no tensor of the loaded model views, and fault
in now the ones decode steps read whole.

safetensors maps each shard whole, and a tensor kept as stored (MXFP4 experts, a bf16 embedding) is a view of
that mapping, so the mapping lives as long as the model. Tensors that were read and then converted (the bf16
linears' packed layout, the fused qkv, anything widened) were faulted in while loading and stay resident in
the mapping, counted in the process's RSS, though nothing reads them again: on the gpt-oss-20b widths that is
the 1.1 GB unembedding and the attention projections (bench/NOTES.md). ``madvise(MADV_DONTNEED)`` on the pages
outside every live view drops them; they are the file's own clean pages, so a later touch would read the file.
Linux only; elsewhere (no /proc/self/maps) nothing is done.

The views that stay (MXFP4 experts kept packed) are read from the file on first touch: without more, a
server's first requests faulted the experts in page by page during their decode steps (4 KiB at a time, and
from disk where the page cache was cold: C=1 TPOT 77 ms against 48 in a warm process, bench/NOTES.md, session
13). ``madvise(MADV_POPULATE_READ)`` (Linux 5.14+) maps them in at load time instead, as llama.cpp reads its
GGUF at load; older kernels get ``MADV_WILLNEED``'s read-ahead. Embedding tables are left out: a token reads
one row of them.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger("gptserve.models")

MADV_WILLNEED = 3
MADV_DONTNEED = 4
MADV_POPULATE_READ = 22
PAGE = mmap.PAGESIZE


def file_mappings(directory: Path) -> list[tuple[int, int]]:
    """[start, end) of this process's mappings of ``*.safetensors`` files in ``directory``."""
    prefix = str(directory.resolve()) + "/"
    found = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                path = fields[5].strip() if len(fields) == 6 else ""
                if path.startswith(prefix) and path.endswith(".safetensors"):
                    start, end = (int(address, 16) for address in fields[0].split("-"))
                    found.append((start, end))
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
        for start, end in unviewed_ranges(mapping, views):
            if madvise(start, end - start, MADV_DONTNEED) == 0:
                released += end - start
            else:
                log.debug("madvise failed with errno %d", ctypes.get_errno())
    return released


def populate_views(tensors: Iterable[torch.Tensor], directory: Path) -> int:
    """Fault in the pages of ``directory``'s mapped checkpoint files that ``tensors`` view; bytes asked for."""
    mappings = file_mappings(directory)
    extents = [extent for tensor in tensors if (extent := byte_extent(tensor)) is not None
               and any(start <= extent[0] < end for start, end in mappings)]
    madvise = libc_madvise()
    populated = 0
    for first, last in extents:
        start, end = first // PAGE * PAGE, -(-last // PAGE) * PAGE
        if madvise(start, end - start, MADV_POPULATE_READ) != 0:  # EINVAL before Linux 5.14
            madvise(start, end - start, MADV_WILLNEED)
        populated += end - start
    return populated
