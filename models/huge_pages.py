"""Weights on 2 MiB pages: a decode step streams every weight once, and on 4 KiB pages each page of it costs
a TLB miss and a page walk.

Linux gives anonymous memory transparent huge pages only where a program asks (the usual ``madvise``
setting), and the weights were already written on 4 KiB pages while loading. ``madvise(MADV_COLLAPSE)``
(Linux 6.1+) moves what a range already holds onto huge pages there and then, whatever the THP setting.
GPT-2-124M's C=1 decode step on bf16-streamed weights went from 8.4-9.5 to 7.7-8.2 ms (bench/NOTES.md).
Where the kernel refuses (older kernels, THP disabled, a file mapping it cannot collapse), nothing changes.

Weights kept as the checkpoint stores them (GPT-OSS's packed MXFP4 experts) are views of safetensors' private,
writable file mappings, which ``MADV_COLLAPSE`` refuses (EINVAL): they sat on huge pages only where the page
cache happened to hold the file in 2 MiB folios, 0-71% of them depending on how the file was last read.
``copy_onto_huge_pages`` gives each its own memory on huge pages. Interleaved in one process, the MXFP4
kernel read 16 layers' experts 7-10% faster from the copies than from the file's pages, and gpt-oss-20b's C=1
TPOT went from 1.26x to 1.09x llama.cpp's (bench/NOTES.md, session 14). The copy also faults the experts in at
load, not during the first requests; it adds ~11 s to gpt-oss-20b's start.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Iterable
from pathlib import Path

import torch

from models.mapped_pages import MADV_DONTNEED, PAGE, byte_extent, file_mappings, libc_madvise, mapping_viewed

log = logging.getLogger("gptserve.models")

MADV_HUGEPAGE = 14
MADV_COLLAPSE = 25
HUGE_PAGE = 2 << 20


def huge_page_spans(extents: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """The whole 2 MiB pages inside ``extents`` ([start, end) byte addresses), extents less than a huge page
    apart merged first: a layer's weights are separate allocations a malloc header apart, most under 2 MiB
    on their own (GPT-2-124M's attention output projection is 1.2 MB), and the few bytes between them are
    this process's own heap, which may as well move too."""
    spans: list[tuple[int, int]] = []
    for start, end in sorted(extents):
        if spans and start < spans[-1][1] + HUGE_PAGE:
            spans[-1] = (spans[-1][0], max(spans[-1][1], end))
        else:
            spans.append((start, end))
    aligned = [(-(-start // HUGE_PAGE) * HUGE_PAGE, end // HUGE_PAGE * HUGE_PAGE) for start, end in spans]
    return [(start, end) for start, end in aligned if end > start]


def collapse_into_huge_pages(tensors: Iterable[torch.Tensor]) -> int:
    """Back the memory of these CPU tensors with huge pages now; bytes collapsed (0 where the kernel cannot)."""
    try:
        madvise = libc_madvise()
    except (OSError, AttributeError):
        return 0
    collapsed = 0
    for start, end in huge_page_spans(extent for t in tensors if (extent := byte_extent(t)) is not None):
        if madvise(start, end - start, MADV_COLLAPSE) == 0:
            collapsed += end - start
        else:
            log.debug("MADV_COLLAPSE refused for %d bytes: errno %d", end - start, ctypes.get_errno())
    return collapsed


def huge_page_empty(nbytes: int) -> torch.Tensor:
    """uint8 [nbytes] from a 2 MiB boundary, asked for huge pages before anything is written to it: where the
    allocator maps fresh memory, each first touch then maps a whole huge page (the unaligned head of the
    allocation is never touched, so never resident). Memory the allocator reuses is on whatever pages it had."""
    block = torch.empty(nbytes + HUGE_PAGE, dtype=torch.uint8)
    head = -block.data_ptr() % HUGE_PAGE
    aligned = block[head : head + nbytes]
    try:
        libc_madvise()(aligned.data_ptr(), nbytes, MADV_HUGEPAGE)  # refused without THP: 4 KiB pages, as before
    except (OSError, AttributeError):
        pass
    return aligned


def copy_onto_huge_pages(tensors: Iterable[torch.Tensor], directory: Path) -> int:
    """Each of ``tensors`` that views ``directory``'s mapped checkpoint gets its own copy on huge pages, swapped
    in where it stands (``tensor.data``, so every module holding the tensor sees the copy); bytes copied.

    The file's pages under each copied tensor leave the process and the page cache as soon as it is copied:
    a load never holds the file's pages and the copies at once, and the cache it would have filled (10 GB for
    gpt-oss-20b) is free for the next copies' huge pages. They are the file's clean pages: anything else that
    viewed them would read the file again."""
    mappings = file_mappings(directory)
    if not mappings:
        return 0
    madvise = libc_madvise()
    files = {mapping.path: os.open(mapping.path, os.O_RDONLY) for mapping in mappings}
    copied = 0
    try:
        for tensor in tensors:
            extent, mapping = byte_extent(tensor), mapping_viewed(tensor, mappings)
            if extent is None or mapping is None:
                continue
            nbytes = tensor.numel() * tensor.element_size()
            if nbytes >= HUGE_PAGE:
                copy = huge_page_empty(nbytes).view(tensor.dtype).view(tensor.shape).copy_(tensor)
                collapse_into_huge_pages([copy])  # reused memory: its pages moved now (fresh memory is huge already)
            else:  # a bias or a norm: a huge page of its own would hold mostly nothing
                copy = tensor.clone(memory_format=torch.contiguous_format)
            tensor.data = copy
            first, last = -(-extent[0] // PAGE) * PAGE, extent[1] // PAGE * PAGE
            if last > first:
                if madvise(first, last - first, MADV_DONTNEED) != 0:
                    log.debug("madvise(MADV_DONTNEED) failed with errno %d", ctypes.get_errno())
                os.posix_fadvise(files[mapping.path], mapping.offset + first - mapping.start, last - first,
                                 os.POSIX_FADV_DONTNEED)
            copied += nbytes
    finally:
        for fd in files.values():
            os.close(fd)
    return copied
