"""``python -m bench.tp_memory DIR``: memory each tensor-parallel rank holds after loading its shard, N = 1, 2, 4.

Writes a mid-size random GPT-OSS checkpoint (HF layout, MXFP4 experts) to DIR unless one is there, then for
each N starts N gloo ranks on this machine, each loading only its slices (``load_weights(..., tp)``), and
prints one JSON line per rank: its parameter bytes, its resident anonymous memory (what it really owns), and
its peak resident set (VmHWM, which also counts the checkpoint's mmapped pages it read). The import-time
baseline (torch and our modules, before loading) is subtracted from the anonymous figure.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from models.loader import load_weights
from models.parallel import TensorParallel

MID_SIZE = {"hidden_size": 1024, "intermediate_size": 1024, "num_hidden_layers": 6, "num_attention_heads": 16,
            "num_key_value_heads": 4, "head_dim": 64, "num_local_experts": 16}


def proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def rank_main(rank: int, world_size: int, port: int, model_dir: Path, dtype: str) -> None:
    store = dist.TCPStore("127.0.0.1", port, world_size, is_master=rank == 0, wait_for_workers=False)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size, timeout=timedelta(minutes=10))
    baseline = proc_status_kib("RssAnon")
    model = load_weights(model_dir, "gpt_oss", getattr(torch, dtype), torch.device("cpu"),
                         tp=TensorParallel(rank, world_size))
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    dist.barrier()
    line = {"N": world_size, "rank": rank, "param_MiB": round(params / 2**20),
            "anon_MiB": round((proc_status_kib("RssAnon") - baseline) / 1024),
            "peak_rss_MiB": round(proc_status_kib("VmHWM") / 1024)}
    print(json.dumps(line), flush=True)
    dist.destroy_process_group()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--sizes", default="1,2,4")
    args = parser.parse_args()
    if not (args.directory / "config.json").is_file():
        from models.testing.gpt_oss_checkpoint import write_tiny_gpt_oss

        write_tiny_gpt_oss(args.directory, **MID_SIZE)
    from tests.server_process import free_port

    for n in (int(s) for s in args.sizes.split(",")):
        mp.start_processes(rank_main, args=(n, free_port(), args.directory, args.dtype), nprocs=n,
                           start_method="spawn")
    return 0


if __name__ == "__main__":
    sys.exit(main())
