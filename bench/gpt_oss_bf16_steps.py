"""``python -m bench.gpt_oss_bf16_steps``: a GPT-OSS prefill and a C=1 decode step in-process, in one CPU mode.

Loads the checkpoint with packed MXFP4 experts in one of the two bf16 modes a CPU can serve GPT-OSS in, and
times a P-token prefill (the whole prompt in one forward, last row's logits) and the decode steps after it:

    --mode bf16          --dtype bfloat16: bf16 activations and weights, bf16 KV cache
    --mode bf16-weights  --cpu-weight-dtype bfloat16 --kv-cache-dtype bfloat16: fp32 compute on bf16 weights

One mode per process (the 20b-width model holds 3.5-7 GiB): alternate the modes run by run to compare them.
``--profile`` prints torch.profiler's ops by self CPU time for one prefill and the decode steps.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from models.forward_batch import ForwardBatch
from models.kv_cache import PagedKVCache
from models.loader import load_model

DEFAULT_CHECKPOINT = Path(".cache/bench/gpt-oss-20b-widths/hf")
MODES = {"bf16": ("bfloat16", "float32"), "bf16-weights": ("float32", "bfloat16")}  # (dtype, cpu_weight_dtype)
BLOCK = 16


class Run:
    """One prompt's KV cache: a prefill of ``prompt`` and then one-token decode steps after it."""

    def __init__(self, model, prompt: list[int], decode_steps: int) -> None:
        self.model, self.prompt = model, prompt
        blocks = -(-(len(prompt) + decode_steps + 1) // BLOCK)
        self.cache = PagedKVCache(model.kv_cache_spec(), blocks, BLOCK, dtype=torch.bfloat16)
        self.table = list(range(blocks))

    def forward(self, tokens: list[int], start: int) -> torch.Tensor:
        batch = ForwardBatch.build([tokens], [start], [self.table], BLOCK)
        return self.model.compute_logits(self.model(batch, self.cache)[-1:])

    def prefill_ms(self) -> float:
        began = time.perf_counter()
        self.forward(self.prompt, 0)
        return 1e3 * (time.perf_counter() - began)

    def decode_ms(self, steps: int) -> list[float]:
        times = []
        for i in range(steps):
            began = time.perf_counter()
            self.forward([self.prompt[i % len(self.prompt)]], len(self.prompt) + i)
            times.append(1e3 * (time.perf_counter() - began))
        return times


def profile(model, prompt: list[int], decode_steps: int, rows: int) -> None:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    for what, steps in (("prefill", 0), ("decode", decode_steps)):
        run = Run(model, prompt, decode_steps)
        if steps:
            run.prefill_ms()
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            run.decode_ms(steps) if steps else run.prefill_ms()
        print(f"--- {what} ({steps or 1} forward(s)), ops by self CPU time")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.gpt_oss_bf16_steps", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    p.add_argument("--mode", choices=MODES, default="bf16")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--decode-steps", type=int, default=8)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--profile-rows", type=int, default=15)
    args = p.parse_args(argv)
    dtype, weight_dtype = MODES[args.mode]
    loaded = load_model(args.checkpoint, dtype, "cpu", keep_experts_packed=True, cpu_weight_dtype=weight_dtype)
    model = loaded.model
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, loaded.tokenizer.vocab_size, (args.prompt_len,), generator=g).tolist()
    with torch.inference_mode():
        Run(model, prompt[:32], 2).prefill_ms()  # warm-up: kernels built, oneDNN primitives created
        if args.profile:
            profile(model, prompt, args.decode_steps, args.profile_rows)
            return
        prefill, decode = [], []
        for _ in range(args.repeats):
            run = Run(model, prompt, args.decode_steps)
            prefill.append(run.prefill_ms())
            decode += run.decode_ms(args.decode_steps)[1:]
    print(f"mode={args.mode} P={args.prompt_len} threads={torch.get_num_threads()} "
          f"prefill ms median {statistics.median(prefill):.0f} (all {', '.join(f'{t:.0f}' for t in prefill)}); "
          f"decode step ms median {statistics.median(decode):.1f} (best {min(decode):.1f})")


if __name__ == "__main__":
    main()
