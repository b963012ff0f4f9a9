"""``python -m bench.gpt_oss_20b_memory DIR``: does a gpt-oss-20b-shaped model load and generate within 24 GiB?

Writes a random checkpoint of the real 20b shape to DIR in the HF layout openai/gpt-oss-20b ships (sharded
safetensors, bf16 weights, float32 norm scales, MXFP4 expert blocks and scales; about 13 GB on disk), loads
it with ``models.loader.load_model(DIR, keep_experts_packed=True)`` and generates a few tokens greedily,
reporting peak memory and tokens/s. The writer runs in a child process (``--write-only``) so this process's
peak is the loader's and the forward's alone. DIR is deleted afterwards unless ``--keep``.

Expected weights in memory (models/mxfp4.py's table): experts packed 9.5 GiB, everything else 6.7 GiB in
float32 (``--dtype auto`` on CPU) or 3.4 GiB in bfloat16; a forward also holds one tile of 512 dequantized
expert rows (5.6 MiB).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from models.mxfp4 import packed_shapes
from models.testing.gpt_oss_checkpoint import TINY_CONFIG, hf_config_json
from models.testing.tokenizer_files import write_gpt_oss_tokenizer

# openai/gpt-oss-20b's config.json values, in TINY_CONFIG's keys.
CONFIG_20B = TINY_CONFIG | {
    "hidden_size": 2880,
    "num_hidden_layers": 24,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "intermediate_size": 2880,
    "num_local_experts": 32,
    "num_experts_per_tok": 4,
    "sliding_window": 128,
}
LAYERS_PER_SHARD = 4
DISK_NEEDED_GB = 14


def layer_tensors(config: dict, i: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Layer i under HF names. MXFP4 scales 2^-8..2^-6 keep expert outputs of order one at width 2880."""
    hidden, inter, experts = config["hidden_size"], config["intermediate_size"], config["num_local_experts"]
    heads, kv_heads, head_dim = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]

    def normal(*shape: int) -> torch.Tensor:
        return torch.empty(shape, dtype=torch.bfloat16).normal_(0.0, 0.02, generator=g)

    m = f"model.layers.{i}."
    tensors = {
        m + "input_layernorm.weight": torch.ones(hidden),
        m + "post_attention_layernorm.weight": torch.ones(hidden),
        m + "self_attn.sinks": normal(heads),
        m + "self_attn.o_proj.weight": normal(hidden, heads * head_dim),
        m + "self_attn.o_proj.bias": normal(hidden),
        m + "mlp.router.weight": normal(experts, hidden),
        m + "mlp.router.bias": normal(experts),
        m + "mlp.experts.gate_up_proj_bias": normal(experts, 2 * inter),
        m + "mlp.experts.down_proj_bias": normal(experts, hidden),
    }
    for name, rows in (("q", heads * head_dim), ("k", kv_heads * head_dim), ("v", kv_heads * head_dim)):
        tensors[m + f"self_attn.{name}_proj.weight"] = normal(rows, hidden)
        tensors[m + f"self_attn.{name}_proj.bias"] = normal(rows)
    for name, shape in (("gate_up_proj", (experts, 2 * inter, hidden)), ("down_proj", (experts, hidden, inter))):
        blocks, scales = packed_shapes(shape)
        tensors[m + f"mlp.experts.{name}_blocks"] = torch.randint(0, 256, blocks, generator=g, dtype=torch.uint8)
        tensors[m + f"mlp.experts.{name}_scales"] = torch.randint(119, 122, scales, generator=g, dtype=torch.uint8)
    return tensors


def embedding_like(vocab: int, hidden: int, g: torch.Generator) -> torch.Tensor:
    return torch.empty(vocab, hidden, dtype=torch.bfloat16).normal_(0.0, 0.02, generator=g)


def write_checkpoint(out: Path, config: dict, seed: int = 0) -> None:
    """One shard per LAYERS_PER_SHARD layers, built and saved one at a time so the writer holds ~2 GB at most."""
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    layers = config["num_hidden_layers"]
    groups = [range(s, min(s + LAYERS_PER_SHARD, layers)) for s in range(0, layers, LAYERS_PER_SHARD)]
    vocab, hidden = config["vocab_size"], config["hidden_size"]
    weight_map, total = {}, 0
    for k, group in enumerate(groups):
        tensors: dict[str, torch.Tensor] = {}
        if k == 0:
            tensors["model.embed_tokens.weight"] = embedding_like(vocab, hidden, g)
        for i in group:
            tensors |= layer_tensors(config, i, g)
        if k == len(groups) - 1:
            tensors["model.norm.weight"] = torch.ones(hidden)
            tensors["lm_head.weight"] = embedding_like(vocab, hidden, g)
        file = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file(tensors, out / file, metadata={"format": "pt"})
        weight_map |= {name: file for name in tensors}
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        print(f"wrote {file}", file=sys.stderr, flush=True)
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (out / "config.json").write_text(json.dumps(hf_config_json(config), indent=2))
    write_gpt_oss_tokenizer(out)


class PeakMemory:
    """Samples /proc/self/status: VmRSS counts the checkpoint's mmapped pages too, RssAnon only our own memory."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.peak_kib = {"VmRSS": 0, "RssAnon": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def now_kib() -> dict[str, int]:
        fields = {}
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon"):
                fields[key] = int(value.split()[0])
        return fields

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            for key, value in self.now_kib().items():
                self.peak_kib[key] = max(self.peak_kib[key], value)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()


def gib(kib: int) -> float:
    return kib / 2**20


@torch.inference_mode()
def load_and_generate(path: Path, dtype: str, prompt_len: int, new_tokens: int, device: str = "cpu",
                      cpu_weight_dtype: str = "float32") -> dict:
    from models.generation import greedy_generate
    from models.loader import load_model

    with PeakMemory() as memory:
        start = time.perf_counter()
        loaded = load_model(path, dtype=dtype, device=device, keep_experts_packed=True,
                            cpu_weight_dtype=cpu_weight_dtype)
        load_s = time.perf_counter() - start
        after_load = PeakMemory.now_kib()
        peak_load = dict(memory.peak_kib)
        prompt = loaded.tokenizer.encode("The quick brown fox jumps over the lazy dog")[:prompt_len]
        start = time.perf_counter()
        (output,) = greedy_generate(loaded.model, [prompt], new_tokens)
        generate_s = time.perf_counter() - start
    params_gib = sum(p.numel() * p.element_size() for p in loaded.model.parameters()) / 2**30
    gpu = {"cuda_max_allocated_gib": torch.cuda.max_memory_allocated() / 2**30} if loaded.device.type == "cuda" else {}
    return {
        "device": str(loaded.device), **gpu,
        "dtype": str(loaded.dtype), "load_s": load_s, "parameters_gib": params_gib,
        "rss_after_load_gib": gib(after_load["VmRSS"]), "anon_after_load_gib": gib(after_load["RssAnon"]),
        "peak_rss_load_gib": gib(peak_load["VmRSS"]), "peak_anon_load_gib": gib(peak_load["RssAnon"]),
        "peak_rss_gib": gib(memory.peak_kib["VmRSS"]), "peak_anon_gib": gib(memory.peak_kib["RssAnon"]),
        "ru_maxrss_gib": gib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss),
        "prompt": prompt, "output": output, "generate_s": generate_s,
        "tokens_per_s_incl_prefill": len(output) / generate_s,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpt_oss_20b_memory", description=__doc__.split("\n\n")[0])
    p.add_argument("dir", type=Path, help="where to write the ~13 GB checkpoint (deleted afterwards unless --keep)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="non-expert weights (auto: float32 on CPU, bfloat16 on GPU)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--cpu-weight-dtype", default="float32", choices=["float32", "bfloat16"],
                   help="bfloat16: the non-expert weights held (and streamed) as bf16 under fp32 compute")
    p.add_argument("--prompt-len", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=3)
    p.add_argument("--layers", type=int, default=24, help="fewer for a quick trial of the same path")
    p.add_argument("--keep", action="store_true", help="keep DIR (and reuse it if it exists)")
    p.add_argument("--write-only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--json-out", type=Path)
    args = p.parse_args(argv)
    config = CONFIG_20B | {"num_hidden_layers": args.layers}
    if args.write_only:
        write_checkpoint(args.dir, config)
        return 0
    if not (args.dir / "config.json").is_file():
        args.dir.mkdir(parents=True, exist_ok=True)
        free_gb = shutil.disk_usage(args.dir).free / 1e9
        if free_gb < DISK_NEEDED_GB * args.layers / 24:
            print(f"only {free_gb:.0f} GB free at {args.dir}", file=sys.stderr)
            return 2
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "bench.gpt_oss_20b_memory", str(args.dir), "--layers",
                        str(args.layers), "--write-only"], check=True)
        print(f"checkpoint written in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    try:
        disk_gb = sum(f.stat().st_size for f in args.dir.iterdir()) / 1e9
        generated = load_and_generate(args.dir, args.dtype, args.prompt_len, args.new_tokens, args.device,
                                      args.cpu_weight_dtype)
        report = {"layers": args.layers, "disk_gb": disk_gb, **generated}
    finally:
        if not args.keep:
            shutil.rmtree(args.dir)
    print(json.dumps(report, indent=2))
    if args.json_out:
        args.json_out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
