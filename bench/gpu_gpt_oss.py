"""``python -m bench.gpu_gpt_oss DIR``: the gpt-oss-20b shape on a GPU, against the limit its weight reads set.

Issue 20's GPU figures in one run: writes the random 20b-shape checkpoint to DIR unless it is there
(bench.gpt_oss_20b_memory's writer: the HF layout with MXFP4 experts, ~13 GB), loads it in bfloat16 (experts
dequantized once at load, the path CUDA graphs capture; ``--keep-experts-packed`` for the packed form), measures
the device's copy bandwidth, and runs bench.engine_throughput's closed loop (P=128, G=128, greedy) at each
concurrency. The batch-1 limit is that bandwidth over the bytes one decode step must read: every weight but the
embedding table (one row of it), of each layer's experts only the k a token picks.

    python -m bench.gpu_gpt_oss .cache/bench/gpt-oss-20b-gpu [--concurrency 1 64] [--json-out F]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn

from bench.engine_throughput import closed_loop
from bench.gpt_oss_20b_memory import CONFIG_20B, write_checkpoint
from bench.gpu_ceilings import copy_bandwidth
from models.loader import load_model
from models.moe import Experts
from server.config import EngineConfig


def decode_bytes_per_token(model: nn.Module, picked: float) -> int:
    """Bytes of weights (parameters and the buffers some linears keep theirs in) a batch-1 decode step reads:
    of the embedding table one row (nothing, at this scale), of a layer's experts the ``picked`` share (k of E)."""
    skipped = set(model.embedding.modules())
    total = 0.0
    for module in model.modules():
        if module in skipped:
            continue
        share = picked if isinstance(module, Experts) else 1.0
        tensors = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        total += share * sum(t.numel() * t.element_size() for t in tensors)
    return int(total)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_gpt_oss", description=__doc__.split("\n\n")[0])
    p.add_argument("dir", type=Path, help="the 20b-shape checkpoint (written here if absent)")
    p.add_argument("--keep-experts-packed", action="store_true")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 64])
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--json-out", type=Path)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure")
        return 1
    if not (args.dir / "config.json").is_file():
        write_checkpoint(args.dir, CONFIG_20B)
    loaded = load_model(args.dir, dtype="bfloat16", device="cuda", keep_experts_packed=args.keep_experts_packed)
    picked = loaded.model.config.experts_per_token / loaded.model.config.num_experts  # the checkpoint's, not ours
    step_bytes = decode_bytes_per_token(loaded.model, picked)
    bandwidth = copy_bandwidth(4096, 20)
    limit = bandwidth / step_bytes
    result = {"device": torch.cuda.get_device_name(), "experts": "packed" if args.keep_experts_packed else "bf16",
              "copy_bandwidth_bytes_s": bandwidth, "decode_bytes_per_token": step_bytes,
              "batch1_tok_s_limit": limit, "out_tok_s": {}}
    print(f"{result['device']}: {bandwidth / 1e12:.2f} TB/s copy; {step_bytes / 1e9:.2f} GB read a decode step "
          f"({result['experts']} experts) -> batch-1 limit {limit:.0f} tok/s", flush=True)
    config = EngineConfig(enforce_eager=args.enforce_eager)
    for c in args.concurrency:
        rate = closed_loop(loaded, config, c, args.prompt_len, args.output_len, seed=c)
        result["out_tok_s"][c] = rate
        print(f"C={c}: {rate:.1f} out tok/s ({rate / limit:.0%} of the batch-1 limit)", flush=True)
    print(f"peak GPU memory allocated: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
