"""``python -m bench.moe_scaling``: does a GPT-OSS MoE layer cost the same per token with 8, 32 or 128 experts?

Two measurements, both with random weights and the same 4 active experts per token:

- one GPT-OSS-shaped MoE layer (hidden = intermediate = 2880, top-4) built from ``models.moe.MoE``: time per
  call and per token at decode-sized (1, 16, 64) and prefill-sized (512) batches. Experts are MXFP4 kept
  packed (dequantized a tile of rows at a time per use, as ``--keep-experts-packed`` serves; 128 experts take
  1.6 GB) or float32 (as the default load; 24.9M values = 95 MiB per expert, so 128 would take 12.7 GB: float
  stops at ``--float-max-experts``).
- a tiny whole GPT-OSS model (models.testing's shape, 3 layers) written with each expert count and run
  through ``greedy_generate``: time per generated token at batch 1 and 16 (16-token prefill included).

``--routing host static`` times each layer both ways: groups sized on the host (the CPU default) and
routed on the device with static shapes (``MoE.static_shapes``, what CUDA graphs and torch.compile need).

Also reports how many distinct experts a call touches: at batch > 1 that grows with the expert count, and
so does any cost paid per expert run (dequantization, weight reads, Python dispatch).

Each part builds all its layers or models first and then goes round them in turn (``--rounds``,
``--model-rounds``), each figure the median of its runs: the ratios compare runs taken moments apart.
All layers at once hold about 6 GB (packed 8 + 32 + 128 experts, float 8 + 32).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from models.moe import MoE

HIDDEN = INTERMEDIATE = 2880
TOP_K = 4
SWIGLU_ALPHA, SWIGLU_LIMIT = 1.702, 7.0


def random_moe(num_experts: int, packed: bool, seed: int = 0) -> MoE:
    """MXFP4 scales 2^-6..2^-4 as in models.testing; float weights and biases normal(0, 0.02)."""
    torch.manual_seed(seed)
    moe = MoE(HIDDEN, INTERMEDIATE, num_experts, TOP_K, SWIGLU_ALPHA, SWIGLU_LIMIT, packed).requires_grad_(False)
    for name, param in moe.named_parameters():
        if name.endswith("_scales"):
            param.random_(121, 124)
        elif name.endswith("_blocks"):
            param.random_(0, 256)
        else:
            param.normal_(0.0, 0.02)
    return moe.eval()


def distinct_experts(moe: MoE, x: torch.Tensor) -> int:
    return torch.topk(moe.router(x), TOP_K, dim=-1).indices.unique().numel()


def in_turn(configs: list[tuple], rounds: int, run) -> dict[tuple, list]:
    """``run(*config)`` for every config, going round them ``rounds`` times: each config's results, in order.
    Taken in turn, a slow minute of the machine falls on every config alike."""
    results: dict[tuple, list] = {config: [] for config in configs}
    for _ in range(rounds):
        for config in configs:
            results[config].append(run(*config))
    return results


@torch.inference_mode()
def time_call(moe: MoE, tokens: int) -> tuple[float, int]:
    """Seconds of one call on fresh random inputs (so routing varies), and the distinct experts they pick."""
    x = torch.randn(tokens, HIDDEN)
    touched = distinct_experts(moe, x)
    start = time.perf_counter()
    moe(x)
    return time.perf_counter() - start, touched


def layer_rows(args: argparse.Namespace) -> list[dict]:
    """Every layer is built first and the calls go round them in turn, ``--rounds`` times; each figure is the
    median of its calls, so a slow minute of the machine falls on every expert count alike (measured one
    after the other, a 32-expert layer once read 1.5x the 8-expert one at one token, where both run the same
    four experts)."""
    layers = {}
    for weights in args.weights:
        for experts in args.experts:
            if weights == "float" and experts > args.float_max_experts:
                continue
            for routing in args.routing:
                layer = random_moe(experts, packed=weights == "packed")
                layer.static_shapes = routing == "static"
                layers[weights, experts, routing] = layer
                time_call(layer, 1)  # warm-up: first-call allocations
    configs = [(*key, tokens) for key in layers for tokens in args.tokens]
    calls = in_turn(configs, args.rounds,
                    lambda weights, experts, routing, tokens: time_call(layers[weights, experts, routing], tokens))
    rows = []
    for (weights, experts, routing, tokens), runs in calls.items():
        per_call = statistics.median(seconds for seconds, _ in runs)
        rows.append({"weights": weights, "experts": experts, "routing": routing, "tokens": tokens, "calls": len(runs),
                     "distinct_experts": statistics.mean(touched for _, touched in runs),
                     "ms_per_call": per_call * 1e3, "ms_per_token": per_call * 1e3 / tokens})
        print(f"layer {rows[-1]}", file=sys.stderr, flush=True)
    return rows


@torch.inference_mode()
def generate_seconds(model: torch.nn.Module, batch: int, new_tokens: int) -> float:
    """One whole greedy_generate; the 16-token prefill is included (subtracting a separate prefill timing gave
    negative numbers on the shared machine)."""
    from models.generation import greedy_generate

    prompts = [[(7 * b + 3 * i) % 50000 for i in range(16)] for b in range(batch)]
    start = time.perf_counter()
    greedy_generate(model, prompts, new_tokens)
    return time.perf_counter() - start


def model_rows(args: argparse.Namespace) -> list[dict]:
    """Every model is loaded first and the runs go round them in turn, ``--model-rounds`` times, each figure
    the median of its runs: measured one after the other, minutes apart, the expert counts' ratios moved by
    a third with the machine's state (bench/NOTES.md, MoE section, session 6)."""
    from models.loader import load_model
    from models.testing.gpt_oss_checkpoint import write_tiny_gpt_oss

    with tempfile.TemporaryDirectory() as tmp:
        models = {}
        for experts in args.experts:
            path = write_tiny_gpt_oss(Path(tmp) / f"e{experts}", num_local_experts=experts)
            for weights in ("packed", "float"):
                models[weights, experts] = load_model(path, device="cpu", keep_experts_packed=weights == "packed").model
        configs = [(weights, experts, batch) for (weights, experts) in models for batch in (1, 16)]
        for weights, experts, batch in configs:
            generate_seconds(models[weights, experts], batch, 2)  # warm-up
        times = in_turn(configs, args.model_rounds,
                        lambda weights, experts, batch: generate_seconds(models[weights, experts], batch,
                                                                         args.model_new_tokens))
    rows = [{"weights": weights, "experts": experts, "batch": batch,
             "ms_per_token": statistics.median(seconds) * 1e3 / (batch * args.model_new_tokens)}
            for (weights, experts, batch), seconds in times.items()]
    for row in rows:
        print(f"tiny model {row}", file=sys.stderr, flush=True)
    return rows


def with_ratios(rows: list[dict], key: tuple[str, ...]) -> list[dict]:
    """Each row's ms_per_token over that of the fewest-experts row with the same ``key`` values."""
    for row in rows:
        peers = [r for r in rows if all(r[k] == row[k] for k in key)]
        base = min(peers, key=lambda r: r["experts"])
        row["ratio_vs_fewest"] = row["ms_per_token"] / base["ms_per_token"]
    return rows


def table(rows: list[dict], columns: tuple[str, ...]) -> str:
    def cell(value: object) -> str:
        return f"{value:.3g}" if isinstance(value, float) else str(value)

    lines = [columns] + [tuple(cell(r[c]) for c in columns) for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(columns))]
    return "\n".join("  ".join(v.rjust(w) for v, w in zip(line, widths)) for line in lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.moe_scaling", description=__doc__.split("\n\n")[0])
    p.add_argument("--experts", type=int, nargs="+", default=[8, 32, 128])
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 64, 512], help="tokens per MoE layer call")
    p.add_argument("--weights", nargs="+", choices=["packed", "float"], default=["packed", "float"])
    p.add_argument("--float-max-experts", type=int, default=32, help="skip float layers with more experts")
    p.add_argument("--routing", nargs="+", choices=["host", "static"], default=["host"],
                   help="MoE grouping sized on the host (the CPU default) or on the device (MoE.static_shapes)")
    p.add_argument("--rounds", type=int, default=7, help="calls of each layer and token count, taken in turn")
    p.add_argument("--model-new-tokens", type=int, default=32, help="tokens per sequence in the tiny-model run")
    p.add_argument("--model-rounds", type=int, default=7, help="runs of each tiny model, taken in turn")
    p.add_argument("--skip-layer", action="store_true")
    p.add_argument("--skip-model", action="store_true")
    p.add_argument("--json-out", type=Path)
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's); 1 resists a shared "
                   "machine, where every parallel op can wait a time slice for a descheduled worker")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch threads: {torch.get_num_threads()}")
    report: dict = {"threads": torch.get_num_threads()}
    if not args.skip_layer:
        report["layer"] = with_ratios(layer_rows(args), ("weights", "routing", "tokens"))
        print("MoE layer, hidden = intermediate = 2880, top-4:")
        print(table(report["layer"], ("weights", "experts", "routing", "tokens", "calls", "distinct_experts",
                                      "ms_per_call", "ms_per_token", "ratio_vs_fewest")))
    if not args.skip_model:
        report["tiny_model"] = with_ratios(model_rows(args), ("weights", "batch"))
        print("tiny GPT-OSS (hidden 64, 3 layers, vocab 201088), greedy decode:")
        print(table(report["tiny_model"], ("weights", "experts", "batch", "ms_per_token", "ratio_vs_fewest")))
    if args.json_out:
        args.json_out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
