"""What the CPU can compute natively, read once at run time, and the rule ``--dtype auto`` draws from it.

bf16 matmuls are "native" where the CPU multiplies bf16 pairs into fp32 sums in hardware: AMX-BF16 tiles
(Sapphire Rapids and later) or AVX512-BF16 dot products (Cooper Lake, Zen 4). Elsewhere torch emulates them
at 1-20 GFLOP/s, far behind fp32, and a bf16 model keeps torch's own matmuls.

``auto`` picks bf16 wherever it is native. On AMX it measured 3-4x fp32's matmul rate (BASELINES.md); on
AVX512-BF16 without AMX, faster too (bench/NOTES.md, "bf16 compute on CPU"): a Zen 4's matmuls 1.1-1.2x at 64
rows and ~2x at 1k rows, a GPT-2-124M 1k prefill 2-4x and a C=64 decode step 1.4-1.9x; a Zen 5's oneDNN
matmuls 1.8-2.1x, the prefill 1.3x, the decode step 1.7x, served C=1 1.7x. The test suite pins float32
(tests/conftest.py), which every oracle comparison needs, and ``--dtype float32`` keeps the exact path.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch

CPUINFO = Path("/proc/cpuinfo")


@dataclass(frozen=True, slots=True)
class CpuIsa:
    """The instruction-set extensions that decide how fast each dtype's matmuls run."""

    amx_bf16: bool = False
    avx512_bf16: bool = False
    avx512: bool = False
    avx2: bool = False

    @property
    def native_bf16(self) -> bool:
        """bf16 products with fp32 accumulation in hardware (not emulated through fp32)."""
        return self.amx_bf16 or self.avx512_bf16

    @property
    def bf16_faster_than_fp32(self) -> bool:
        """The rule ``--dtype auto`` follows on CPU (see the module's docstring)."""
        return self.native_bf16

    def __str__(self) -> str:
        names = [name for name, present in (("AMX-BF16", self.amx_bf16), ("AVX512-BF16", self.avx512_bf16),
                                            ("AVX-512", self.avx512), ("AVX2", self.avx2)) if present]
        return ", ".join(names) or "none of AMX-BF16, AVX512-BF16, AVX-512, AVX2"

    @classmethod
    def from_flags(cls, flags: set[str]) -> CpuIsa:
        """From the kernel's names in /proc/cpuinfo; AMX needs its tile registers as well as the bf16 unit."""
        return cls(
            amx_bf16={"amx_bf16", "amx_tile"} <= flags,
            avx512_bf16="avx512_bf16" in flags,
            avx512="avx512f" in flags,
            avx2="avx2" in flags,
        )

    @classmethod
    def from_torch(cls) -> CpuIsa:
        """Where /proc/cpuinfo is missing: torch's own dispatch level (which does not report the bf16 units)."""
        capability = torch.backends.cpu.get_cpu_capability()
        return cls(avx512=capability.startswith("AVX512"), avx2=capability.startswith(("AVX2", "AVX512")))


def cpuinfo_flags(text: str) -> set[str]:
    """The first processor's ``flags`` line (all cores of a machine report the same extensions)."""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return set()


@functools.cache
def cpu_isa() -> CpuIsa:
    """This machine's report, read once."""
    try:
        flags = cpuinfo_flags(CPUINFO.read_text())
    except OSError:
        flags = set()
    return CpuIsa.from_flags(flags) if flags else CpuIsa.from_torch()
