"""``python -m bench.llama_cpp``: llama.cpp's server, built from a pinned source, as the reference to measure against.

The llama-cpp-python sdist on PyPI vendors a whole llama.cpp tree, so the reference is pinned by one version
number and needs nothing beyond the package index: ``build`` downloads it, compiles ``llama-server`` (CMake
Release, native ISA) into a cache outside git, ``convert`` turns a checkpoint directory into GGUF with llama.cpp's
own ``convert_hf_to_gguf.py``, and ``serve`` runs the server on a GGUF the way earlier sessions measured it
(``-np 64 -t 2``). Measure it with ``python -m bench.serve_bench --base-url http://127.0.0.1:PORT/v1``.
Never run in CI: the build takes about ten minutes on two cores.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
from pathlib import Path

LLAMA_CPP_PYTHON = "0.3.36"  # vendors llama.cpp commit 0c1e570 (bench/NOTES.md, session 6)
CACHE = Path(os.environ.get("GPTSERVE_BENCH_CACHE", Path.home() / ".cache" / "gptserve-bench"))


def source_tree() -> Path:
    """The vendored llama.cpp tree, downloaded and unpacked once."""
    root = CACHE / f"llama_cpp_python-{LLAMA_CPP_PYTHON}"
    tree = root / "vendor" / "llama.cpp"
    if tree.is_dir():
        return tree
    CACHE.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                    f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", str(CACHE)], check=True)
    with tarfile.open(CACHE / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz") as archive:
        archive.extractall(CACHE, filter="data")
    return tree


def server_binary() -> Path:
    return source_tree() / "build" / "bin" / "llama-server"


def build(jobs: int) -> Path:
    tree = source_tree()
    if not server_binary().is_file():
        subprocess.run(["cmake", "-S", str(tree), "-B", str(tree / "build"), "-DCMAKE_BUILD_TYPE=Release",
                        "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                        "-DLLAMA_BUILD_EXAMPLES=OFF"], check=True)
        subprocess.run(["cmake", "--build", str(tree / "build"), "--target", "llama-server", "-j", str(jobs)],
                       check=True)
    return server_binary()


def convert(checkpoint: Path, out: Path, outtype: str) -> Path:
    """llama.cpp's converter with its own gguf-py first on the path (the PyPI ``gguf`` may lag the tree)."""
    tree = source_tree()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tree / "gguf-py"), os.environ.get("PYTHONPATH", "")]))
    subprocess.run([sys.executable, str(tree / "convert_hf_to_gguf.py"), str(checkpoint), "--outfile", str(out),
                    "--outtype", outtype], check=True, env=env)
    return out


def serve(gguf: Path, port: int, threads: int, parallel: int, context: int) -> int:
    command = [str(server_binary()), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
               "-t", str(threads), "-np", str(parallel), "-c", str(context)]
    return subprocess.run(command, check=False).returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.llama_cpp", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    build_cmd = commands.add_parser("build", help="download the pinned source and build llama-server")
    build_cmd.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    convert_cmd = commands.add_parser("convert", help="a checkpoint directory to GGUF")
    convert_cmd.add_argument("checkpoint", type=Path)
    convert_cmd.add_argument("out", type=Path)
    convert_cmd.add_argument("--outtype", default="f16", choices=["f32", "f16", "bf16", "q8_0"])
    serve_cmd = commands.add_parser("serve", help="run llama-server on a GGUF (blocks)")
    serve_cmd.add_argument("gguf", type=Path)
    serve_cmd.add_argument("--port", type=int, default=8080)
    serve_cmd.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    serve_cmd.add_argument("--parallel", type=int, default=64, help="server slots (-np)")
    serve_cmd.add_argument("--context", type=int, default=65536, help="total context over all slots (-c)")
    args = parser.parse_args(argv)
    if args.command == "build":
        print(build(args.jobs))
    elif args.command == "convert":
        print(convert(args.checkpoint, args.out, args.outtype))
    else:
        return serve(args.gguf, args.port, args.threads, args.parallel, args.context)
    return 0


if __name__ == "__main__":
    sys.exit(main())
