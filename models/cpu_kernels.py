"""The project's C++ CPU kernels (models/csrc/), compiled on first use by torch's extension builder.

They are built once per machine into torch's extension cache (about 15 s with g++ and ninja) and registered
as ``torch.ops.gptserve.*``. Where the build fails, the models keep their pure-torch paths and say so once.

torch guards a build with a lock file that a process killed mid-build leaves behind, and every later start then
waits on it forever. Builds here are serialised by an flock instead (the kernel drops it when its holder dies);
whoever holds it may remove torch's lock file, since no other gptserve process can be building.
"""

from __future__ import annotations

import fcntl
import functools
import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCES = [Path(__file__).parent / "csrc" / name
           for name in ("paged_decode_attention.cpp", "bf16_linear.cpp", "bf16_dot_linear.cpp", "mxfp4_linear.cpp",
                        "mxfp4_bf16_linear.cpp", "mxfp4_dequantize.cpp", "mxfp4_dot_linear.cpp",
                        "gpt2_decode_block.cpp", "gpt_oss_decode_layer.cpp")]


KERNELS_NAME = "gptserve_cpu_kernels"


def build_directory() -> Path:
    """The folder torch's extension builder uses for the kernels (its own rule: TORCH_EXTENSIONS_DIR or its cache)."""
    from torch.utils.cpp_extension import _get_build_directory

    return Path(_get_build_directory(KERNELS_NAME, verbose=False))


@torch.compiler.assume_constant_result  # torch.compile takes the answer as is instead of tracing the build
def cpu_kernels_loaded() -> bool:
    """Build (or find already built) and load the kernels; False, logged once, where that is impossible."""
    return _build_once()


def _build() -> bool:
    try:
        from torch.utils.cpp_extension import load

        build_dir = build_directory()
        with (build_dir / "gptserve.flock").open("w") as held:
            fcntl.flock(held, fcntl.LOCK_EX)
            (build_dir / "lock").unlink(missing_ok=True)  # torch's own, left by a build that was killed
            load(
                name=KERNELS_NAME,
                sources=[str(p) for p in SOURCES],
                # at::parallel_for runs its threads through OpenMP only in code compiled with it; the library
                # it links is torch's own libgomp.so.1, already loaded, so there is one thread pool.
                extra_cflags=["-O3", "-fopenmp"],
                extra_ldflags=["-fopenmp"],
                build_directory=str(build_dir),
                is_python_module=False,
            )
    except Exception as error:  # a missing compiler or ninja surfaces as several exception types
        log.warning("C++ CPU kernels unavailable, decode attention gathers the KV cache instead (bf16 weights "
                    "stream as fp32, MXFP4 experts are dequantized a tile at a time): %s", error)
        return False
    return True


cpu_kernels_loaded.__wrapped__ = _build  # the uncached attempt, as when functools.cache wrapped it directly


@functools.cache
def _build_once() -> bool:
    if not _build():
        return False
    _register_output_shapes()
    return True


def _register_output_shapes() -> None:
    """The output of the kernels a decode step runs, for torch.compile's tracing on tensors that have no data
    (tests/test_gpt_oss_compile.py). The other kernels have none yet: nothing compiles them."""
    fake = torch.library.register_fake
    fake("gptserve::paged_decode_attention")(
        lambda q, keys, values, blocks, context_lens, block_size, window, scale, sinks, isa="best": torch.empty_like(q))
    fake("gptserve::mxfp4_grouped_linear")(
        lambda x, counts, blocks, scales, bias, isa="best": x.new_empty(x.shape[0], blocks.shape[1]))


def decode_kernels_apply(q: torch.Tensor) -> bool:
    """The paged decode kernels compute in float32 on CPU; a bf16 model's queries are widened for them."""
    return q.device.type == "cpu" and q.dtype in (torch.float32, torch.bfloat16) and cpu_kernels_loaded()
