"""The project's C++ CPU kernels (models/csrc/), compiled on first use by torch's extension builder.

They are built once per machine into torch's extension cache (about 15 s with g++ and ninja) and registered
as ``torch.ops.gptserve.*``. Where the build fails, the models keep their pure-torch paths and say so once.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCES = [Path(__file__).parent / "csrc" / name
           for name in ("paged_decode_attention.cpp", "bf16_linear.cpp", "mxfp4_linear.cpp")]


@functools.cache
def cpu_kernels_loaded() -> bool:
    """Build (or find already built) and load the kernels; False, logged once, where that is impossible."""
    try:
        from torch.utils.cpp_extension import load

        load(
            name="gptserve_cpu_kernels",
            sources=[str(p) for p in SOURCES],
            # at::parallel_for runs its threads through OpenMP only in code compiled with it; the library
            # it links is torch's own libgomp.so.1, already loaded, so there is one thread pool.
            extra_cflags=["-O3", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
        )
    except Exception as error:  # a missing compiler or ninja surfaces as several exception types
        log.warning("C++ CPU kernels unavailable, decode attention gathers the KV cache instead (bf16 weights "
                    "stream as fp32, MXFP4 experts are dequantized a tile at a time): %s", error)
        return False
    return True


def decode_kernels_apply(q: torch.Tensor) -> bool:
    """The paged decode kernels serve float32 on CPU."""
    return q.device.type == "cpu" and q.dtype == torch.float32 and cpu_kernels_loaded()
