"""Keep large CPU buffers in the heap between engine steps.

glibc serves big allocations with mmap and returns them to the kernel on free, so every step's activations,
logits and gathered KV pages are faulted in afresh: on a 2-core machine that alone cost more than the copies
themselves (a 50 MB gather took 66 ms instead of 8). Raising the mmap and trim thresholds makes freed blocks
reusable by the next step. The engine steps on its own thread, and glibc gives threads their own arenas
whose heaps are capped at 64 MB, so a thread's big buffers would still be mmapped: one arena for the whole
process sends them to the tuned main heap too. Measured in bench/NOTES.md.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger("gptserve.engine")

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
_ONE_GIB = 1 << 30


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def keep_freed_memory_in_heap() -> bool:
    """Tune glibc's allocator for this process; a no-op (False) where glibc is not the C library.

    Call it before starting the threads that allocate the big buffers: a thread keeps the arena it first got.
    """
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is None:
        return False
    ok = all(
        mallopt(option, value) == 1
        for option, value in ((_M_ARENA_MAX, 1), (_M_MMAP_THRESHOLD, _ONE_GIB), (_M_TRIM_THRESHOLD, 2 * _ONE_GIB - 1))
    )
    if not ok:
        log.warning("could not tune glibc's arenas and mmap/trim thresholds; CPU steps will page-fault their buffers")
    return ok


def release_free_heap() -> bool:
    """Hand the free pages inside the heap back to the kernel (glibc's ``malloc_trim``), once start-up is done.

    Loading leaves freed memory scattered through the heap (the tokenizer's parsed JSON, conversion buffers),
    where neither the trim threshold nor the heap's top reaches it: ~120 MB of resident memory in a GPT-OSS
    core. False where glibc is not the C library."""
    malloc_trim = getattr(_libc(), "malloc_trim", None)
    if malloc_trim is None:
        return False
    malloc_trim(0)
    return True
