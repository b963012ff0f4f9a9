"""``python -m bench.mxfp4_kernel``: the MXFP4 expert kernel's speed in GB/s of packed bytes, old against new.

The kernel of a base revision (``--base``, default HEAD) is compiled beside the working tree's under another
op namespace (``gptserve_base``), so both run in one process and the calls alternate: a slow moment of the
shared machine falls on both alike. Shapes are those of a gpt-oss-20b decode step: one 5760x2880 (gate_up)
and one 2880x2880 (down) matrix at one row, the first at eight rows, and grouped calls like a MoE layer's (4
experts x 1 row, 16 experts x 2 rows). Every call reads weights that are not in cache: each shape cycles
through enough copies (or experts) to pass the 32 MiB L3. Reported: the median over ``--rounds`` of each
(shape, threads, kernel), and packed bytes (blocks + scales) read per second.

``--bf16`` times, instead of a base revision, the kernel's two ways with bf16 tokens (a ``--dtype bfloat16``
model's decode rows): "base" widens them to fp32 for the fp32 kernel and rounds its result back, "new" is its
bf16 form (models/csrc/mxfp4_bf16_linear.cpp, AVX512-BF16 CPUs only).

``--checkpoint DIR`` times the in-process GPT-OSS decode step instead (C=1, experts packed, bf16 weights
and KV cache as bench.gpt_oss_vs_llama_cpp serves them): ``--rounds`` rounds of ``--steps`` steps with each
kernel in turn, the MoE layers' grouped calls redirected to the base kernel for its turns, on the first of
``--threads``. Reported: median step time and the median of the kernel's own time in a step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from models.cpu_kernels import cpu_kernels_loaded

CSRC = Path(__file__).resolve().parent.parent / "models" / "csrc"
# Weights cycled through per shape: at least this many bytes, so that no call finds its matrix in the L3.
MIN_WORKING_BYTES = 256 << 20


def load_base_kernel(revision: str) -> None:
    """Compiles ``revision``'s mxfp4_linear.cpp as ``torch.ops.gptserve_base``."""
    from torch.utils.cpp_extension import load

    source = subprocess.run(["git", "show", f"{revision}:models/csrc/mxfp4_linear.cpp"], check=True,
                            capture_output=True, text=True, cwd=CSRC).stdout
    source = source.replace("TORCH_LIBRARY_FRAGMENT(gptserve,", "TORCH_LIBRARY_FRAGMENT(gptserve_base,")
    source = source.replace("TORCH_LIBRARY_IMPL(gptserve,", "TORCH_LIBRARY_IMPL(gptserve_base,")
    build = Path(tempfile.mkdtemp(prefix="mxfp4_base_"))
    (build / "mxfp4_base.cpp").write_text(source)
    load(name="gptserve_mxfp4_base", sources=[str(build / "mxfp4_base.cpp")], extra_include_paths=[str(CSRC)],
         extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"], build_directory=str(build),
         is_python_module=False)


def packed(copies: int, out_features: int, in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random blocks and scales (2^-6..2^-4, as models.testing) for ``copies`` matrices [O, I]."""
    blocks = torch.randint(0, 256, (copies, out_features, in_features // 32, 16), dtype=torch.uint8)
    scales = torch.randint(121, 124, (copies, out_features, in_features // 32), dtype=torch.uint8)
    return blocks, scales


class Shape:
    """One call shape: ``experts`` x ``rows`` rows against [out, in] matrices (experts=0: mxfp4_linear)."""

    def __init__(self, name: str, out_features: int, in_features: int, experts: int, rows: int) -> None:
        self.name, self.experts, self.rows = name, experts, rows
        one = out_features * (in_features // 32) * 17
        self.copies = max(-(-MIN_WORKING_BYTES // one), 2 * max(experts, 1))
        self.blocks, self.scales = packed(self.copies, out_features, in_features)
        self.bias = torch.randn(self.copies, out_features)
        self.bytes_per_call = one * max(experts, 1)
        self.x = torch.randn(max(experts, 1) * rows, in_features)
        self.counts = torch.full((experts,), rows, dtype=torch.int64)
        self.turn = 0

    def call(self, ops) -> float:
        """Seconds of one call of ``ops`` (a torch.ops namespace), on the next weights in the cycle."""
        self.turn += 1
        if self.experts == 0:
            i = self.turn % self.copies
            start = time.perf_counter()
            ops.mxfp4_linear(self.x, self.blocks[i], self.scales[i], self.bias[i])
            return time.perf_counter() - start
        first = (self.turn * self.experts) % (self.copies - self.experts + 1)
        chosen = slice(first, first + self.experts)
        counts = torch.zeros(self.copies, dtype=torch.int64)
        counts[chosen] = self.rows
        start = time.perf_counter()
        ops.mxfp4_grouped_linear(self.x, counts, self.blocks, self.scales, self.bias)
        return time.perf_counter() - start


class WidenedBf16:
    """bf16 tokens through the fp32 kernel, as a model without the bf16 form runs them."""

    @staticmethod
    def mxfp4_linear(x, blocks, scales, bias):
        return torch.ops.gptserve.mxfp4_linear(x.float(), blocks, scales, bias).bfloat16()

    @staticmethod
    def mxfp4_grouped_linear(x, counts, blocks, scales, bias):
        return torch.ops.gptserve.mxfp4_grouped_linear(x.float(), counts, blocks, scales, bias).bfloat16()


class Bf16Form:
    """bf16 tokens through the kernel's bf16 form (one expert: a group of one)."""

    @staticmethod
    def mxfp4_linear(x, blocks, scales, bias):
        return torch.ops.gptserve.mxfp4_grouped_linear_bf16(x, torch.tensor([len(x)]), blocks[None], scales[None],
                                                            bias[None])

    @staticmethod
    def mxfp4_grouped_linear(x, counts, blocks, scales, bias):
        return torch.ops.gptserve.mxfp4_grouped_linear_bf16(x, counts, blocks, scales, bias)


def decode_steps(checkpoint: Path, rounds: int, steps: int, threads: int) -> None:
    """C=1 decode steps of the checkpoint, the two kernels alternated a round of ``steps`` steps at a time."""
    import models.moe as moe
    from models.loader import load_model
    from server.engine.engine import EngineConfig, LLMEngine
    from server.engine.sampling_params import SamplingParams

    torch.set_num_threads(threads)
    loaded = load_model(checkpoint, device="cpu", keep_experts_packed=True, cpu_weight_dtype="bfloat16")
    engine = LLMEngine(loaded, EngineConfig(max_num_seqs=1, max_num_batched_tokens=512, kv_cache_dtype="bfloat16",
                                            kv_cache_tokens=512 + 2 * rounds * (steps + 1) + 64))
    engine.add_request("r", list(range(1000, 1128)), SamplingParams(max_tokens=2 * rounds * (steps + 1) + 8,
                                                                    temperature=0.0, ignore_eos=True))
    for _ in range(4):  # the prompt, then warm-up decode steps
        engine.step()
    plain = moe.grouped_linear_mxfp4
    kernel_seconds = [0.0]

    def timed(ops):
        def grouped(x, counts, blocks, scales, bias):
            start = time.perf_counter()
            out = ops.mxfp4_grouped_linear(x.contiguous(), torch.tensor(counts, dtype=torch.int64), blocks, scales,
                                           bias)
            kernel_seconds[0] += time.perf_counter() - start
            return out
        return grouped

    results: dict[str, tuple[list[float], list[float]]] = {"base": ([], []), "new": ([], [])}
    try:
        for _ in range(rounds):
            for name, ops in (("base", torch.ops.gptserve_base), ("new", torch.ops.gptserve)):
                moe.grouped_linear_mxfp4 = timed(ops)
                for _ in range(steps):
                    kernel_seconds[0] = 0.0
                    start = time.perf_counter()
                    engine.step()
                    results[name][0].append(time.perf_counter() - start)
                    results[name][1].append(kernel_seconds[0])
    finally:
        moe.grouped_linear_mxfp4 = plain
    load = Path("/proc/loadavg").read_text().split()[:3]
    row: dict[str, object] = {"checkpoint": str(checkpoint), "threads": threads, "steps_each": rounds * steps,
                              "loadavg": load}
    for name, (step, kernel) in results.items():
        assert max(kernel) > 0, "the MoE layers did not call grouped_linear_mxfp4"
        row[f"{name}_step_ms"] = round(statistics.median(step) * 1e3, 2)
        row[f"{name}_kernel_ms"] = round(statistics.median(kernel) * 1e3, 2)
    print(json.dumps(row), flush=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.mxfp4_kernel", description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default="HEAD", help="git revision whose kernel is the baseline (default HEAD)")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--bf16", action="store_true", help="bf16 tokens: widened for the fp32 kernel against its bf16 form")
    p.add_argument("--checkpoint", type=Path, help="time this GPT-OSS checkpoint's decode steps instead")
    p.add_argument("--steps", type=int, default=5, help="decode steps per kernel per round (--checkpoint)")
    args = p.parse_args(argv)
    if not cpu_kernels_loaded():
        sys.exit("the C++ kernels did not build")
    if args.bf16 and args.checkpoint:
        p.error("--checkpoint compares the kernel with --base's, not with its bf16 form")
    kernels: dict[str, object] = {"base": WidenedBf16, "new": Bf16Form}
    if not args.bf16:
        load_base_kernel(args.base)
        kernels = {"base": torch.ops.gptserve_base, "new": torch.ops.gptserve}
    if args.checkpoint:
        decode_steps(args.checkpoint, args.rounds, args.steps, args.threads[0])
        return
    shapes = [Shape("5760x2880 x1", 5760, 2880, 0, 1), Shape("2880x2880 x1", 2880, 2880, 0, 1),
              Shape("5760x2880 x8", 5760, 2880, 0, 8),
              Shape("grouped 4x1 5760x2880", 5760, 2880, 4, 1), Shape("grouped 16x2 5760x2880", 5760, 2880, 16, 2)]
    if args.bf16:
        extra = [Shape("5760x2880 x2", 5760, 2880, 0, 2), Shape("5760x2880 x4", 5760, 2880, 0, 4)]
        shapes = shapes[:2] + extra + shapes[2:]
        for shape in shapes:
            shape.x = shape.x.bfloat16()
    threads_before = torch.get_num_threads()
    times: dict[tuple[str, int, str], list[float]] = {}
    try:
        for _ in range(args.rounds):
            for threads in args.threads:
                torch.set_num_threads(threads)
                for shape in shapes:
                    for name, ops in kernels.items():
                        times.setdefault((shape.name, threads, name), []).append(shape.call(ops))
    finally:
        torch.set_num_threads(threads_before)
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else []
    for shape in shapes:
        for threads in args.threads:
            row = {"shape": shape.name, "threads": threads, "loadavg": load}
            for name in kernels:
                seconds = statistics.median(times[shape.name, threads, name][1:])  # the first call warms up
                row[f"{name}_ms"] = round(seconds * 1e3, 3)
                row[f"{name}_gb_s"] = round(shape.bytes_per_call / seconds / 1e9, 1)
            row["new_vs_base"] = round(row["base_ms"] / row["new_ms"], 3)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
