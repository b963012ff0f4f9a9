"""``python -m bench.bf16_linear_kernel``: the bf16-weight linear kernel's speed in GB/s of weights, old against new.

The kernel of a base revision (``--base``, default HEAD) is compiled beside the working tree's under another op
namespace (``gptserve_base``), with the weight packed in that revision's layout (``--base-lanes``: 8 outputs a
group and one input per word before the paired layout, 32 and two after), so both run in one process and the
calls alternate: a slow moment of the shared machine falls on both alike. Shapes are GPT-2-124M's and
gpt-oss-20b's layers and unembeddings, at decode-sized row counts; every call reads weights that are not in
cache (each shape cycles through enough copies to pass the 32 MiB L3). Reported: the median over ``--rounds``
of each (shape, rows, kernel), and weight bytes read per second.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from models.bf16_weight_linear import pack_bf16_weight
from models.cpu_kernels import cpu_kernels_loaded

CSRC = Path(__file__).resolve().parent.parent / "models" / "csrc"
MIN_WORKING_BYTES = 256 << 20  # weights cycled through per shape, so that no call finds its matrix in the L3
SHAPES = {"gpt2 c_attn": (2304, 768), "gpt2 c_fc": (3072, 768), "gpt2 mlp.c_proj": (768, 3072),
          "gpt2 unembedding": (50257, 768), "gpt-oss qkv": (5120, 2880), "gpt-oss o_proj": (2880, 4096),
          "gpt-oss unembedding": (201088, 2880)}


def load_base_kernel(revision: str) -> None:
    """Compiles ``revision``'s bf16_linear.cpp as ``torch.ops.gptserve_base``."""
    from torch.utils.cpp_extension import load

    source = subprocess.run(["git", "show", f"{revision}:models/csrc/bf16_linear.cpp"], check=True,
                            capture_output=True, text=True, cwd=CSRC).stdout
    for namespace in ("TORCH_LIBRARY_FRAGMENT(gptserve,", "TORCH_LIBRARY_IMPL(gptserve,", "namespace gptserve {"):
        source = source.replace(namespace, namespace.replace("gptserve", "gptserve_base"))
    build = Path(tempfile.mkdtemp(prefix="bf16_linear_base_"))
    (build / "bf16_linear_base.cpp").write_text(source)
    load(name="gptserve_bf16_linear_base", sources=[str(build / "bf16_linear_base.cpp")],
         extra_include_paths=[str(CSRC)], extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"],
         build_directory=str(build), is_python_module=False)


def pack_one_input_a_word(weight: torch.Tensor, lanes: int) -> torch.Tensor:
    """[N, K] -> [ceil(N/lanes), K, lanes] int16 bf16 bits: the layout before inputs were paired in words."""
    n, k = weight.shape
    bits = F.pad(weight.to(torch.bfloat16), (0, 0, 0, -n % lanes)).view(torch.int16)
    return bits.view(-1, lanes, k).transpose(1, 2).contiguous()


class Shape:
    """One weight shape, in ``copies`` random matrices packed for each kernel."""

    def __init__(self, name: str, out_features: int, in_features: int, base_lanes: int) -> None:
        self.name, self.out_features, self.in_features = name, out_features, in_features
        self.bytes = out_features * in_features * 2
        copies = max(1, -(-MIN_WORKING_BYTES // self.bytes))
        weights = [torch.randn(out_features, in_features) for _ in range(copies)]
        paired = base_lanes == 32
        self.packed = {"base": [pack_bf16_weight(w) if paired else pack_one_input_a_word(w, base_lanes)
                                for w in weights],
                       "new": [pack_bf16_weight(w) for w in weights]}
        self.turn = 0

    def call(self, kernel: str, x: torch.Tensor) -> float:
        """Seconds of one call of ``kernel`` on the next matrix in the cycle."""
        ops = torch.ops.gptserve_base if kernel == "base" else torch.ops.gptserve
        self.turn += 1
        packed = self.packed[kernel][self.turn % len(self.packed[kernel])]
        start = time.perf_counter()
        ops.bf16_linear(x, packed, None, self.out_features)
        return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.bf16_linear_kernel", description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default="HEAD", help="git revision whose kernel is the baseline (default HEAD)")
    p.add_argument("--base-lanes", type=int, default=32, choices=[8, 32], help="outputs a group in --base's layout")
    p.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 64])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--rounds", type=int, default=9)
    args = p.parse_args(argv)
    if not cpu_kernels_loaded():
        raise SystemExit("the C++ kernels did not build")
    load_base_kernel(args.base)
    for name in args.shapes:
        shape = Shape(name, *SHAPES[name], args.base_lanes)
        for threads in args.threads:
            torch.set_num_threads(threads)
            for rows in args.rows:
                x = torch.randn(rows, shape.in_features)
                times: dict[str, list[float]] = {"base": [], "new": []}
                for kernel in times:  # warm-up: page in every copy once
                    for _ in range(len(shape.packed[kernel])):
                        shape.call(kernel, x)
                for _ in range(args.rounds):
                    for kernel in times:
                        times[kernel].append(shape.call(kernel, x))
                row: dict[str, object] = {"shape": name, "threads": threads, "rows": rows}
                for kernel, seconds in times.items():
                    median = statistics.median(seconds)
                    row[f"{kernel}_ms"] = round(1e3 * median, 3)
                    row[f"{kernel}_GBps"] = round(shape.bytes / median / 1e9, 1)
                print(json.dumps(row), flush=True)
        del shape


if __name__ == "__main__":
    main()
