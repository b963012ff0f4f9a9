"""The capacity plan of docs/scaling.md: replicas x tensor-parallel size for a target request rate.

Every throughput comes from bench/NOTES.md, read by the patterns below, so a new measurement there changes
the plan (and tests/test_scaling_doc.py fails until the document is regenerated). Nothing is measured here.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

NOTES = Path(__file__).resolve().parent / "NOTES.md"
TARGET_RATES = (1, 10, 100)  # requests per second
UTILIZATION = 0.7  # plan each replica at 70% of its measured peak, so queues stay short under bursts


@dataclass(frozen=True, slots=True)
class Measurement:
    model: str
    hardware: str
    out_tokens_per_s: float  # one replica, as measured
    tokens_per_request: int  # generated tokens per request in that measurement
    source: str  # where in NOTES.md, in words
    note: str = ""


def _number(text: str) -> float:
    return float(text.replace(",", ""))


def _table_row(notes: str, heading: str, label: str) -> list[str]:
    """The cells of the first row starting ``| label |`` in the section under ``heading``."""
    section = notes[notes.index(heading):]
    row = re.search(rf"^\| {re.escape(label)} \|(.*)\|$", section, re.MULTILINE)
    if row is None:
        raise ValueError(f"bench/NOTES.md: no row '{label}' under '{heading}'")
    return [cell.strip() for cell in row.group(1).split("|")]


def measurements(notes: str) -> list[Measurement]:
    """The serving figures the plan rests on, read from the notes."""
    cuda = "### Serving (`bench.serve_bench`, P=128 G=128"
    cpu = "### Serving benchmark, session 7"
    generated = int(re.search(r"P=\d+ G=(\d+)", notes[notes.index(cuda):]).group(1))
    gpt_oss = re.search(r"32 tokens\s+from a 2-token prompt in [\d.]+ s \(([\d.]+) tok/s\)", notes)
    if gpt_oss is None:
        raise ValueError("bench/NOTES.md: the gpt-oss-20b H100 decode rate is missing")
    gpt_oss_rate = float(gpt_oss.group(1))
    return [
        Measurement("GPT-2 124M", "H100", _number(_table_row(notes, cuda, "graphs, final")[3]), generated,
                    "CUDA serving table, graphs, C=64"),
        Measurement("GPT-2 124M", "2 CPU cores", _number(_table_row(notes, cpu, "ours")[3]), generated,
                    "serving benchmark session 7, C=64"),
        Measurement("gpt-oss-20b", "H100", gpt_oss_rate, generated,
                    "gpt_oss_20b_memory on the H100, one sequence", "batch 1: batched GPT-OSS serving is not measured"),
        Measurement("gpt-oss-120b", "H100", gpt_oss_rate * 24 / 36, generated,
                    "not measured: the 20b rate x 24/36 layers", "the 20b step is bound per expert run, 4 a layer"),
    ]


@dataclass(frozen=True, slots=True)
class Plan:
    measurement: Measurement
    tensor_parallel: int

    @property
    def requests_per_s(self) -> float:
        """What one replica is planned to serve."""
        return self.measurement.out_tokens_per_s / self.measurement.tokens_per_request * UTILIZATION

    def replicas(self, target: float) -> int:
        return math.ceil(target / self.requests_per_s)


def render(min_tensor_parallel: dict[str, int]) -> list[str]:
    """The section's lines; ``min_tensor_parallel`` maps a gpt-oss model to the fewest GPUs that hold it."""
    plans = [Plan(m, min_tensor_parallel.get(m.model, 1)) for m in measurements(NOTES.read_text())]
    rates = " / ".join(str(r) for r in TARGET_RATES)
    lines = [
        "## Capacity plan",
        "",
        f"Replicas and GPUs for a target of {rates} requests/s of the benchmark's shape (prompt 128, "
        f"{plans[0].measurement.tokens_per_request} generated tokens), each replica planned at {UTILIZATION:.0%} "
        "of its measured output rate (bench/NOTES.md, read by `bench/capacity_plan.py`). Tensor parallel is "
        "the fewest GPUs whose memory holds the weights with experts in MXFP4 (`--keep-experts-packed`) and KV "
        "for 64 sequences of 4096 tokens (tables above); no tensor-parallel throughput is measured, so a "
        "replica's rate is taken as the same at any size. Replicas sit behind the router (deploy/README.md).",
        "",
        f"| model | hardware | measured out tok/s per replica (source) | planned req/s per replica | TP size "
        f"| replicas for {rates} req/s | GPUs for {rates} req/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for plan in plans:
        m = plan.measurement
        replicas = [plan.replicas(rate) for rate in TARGET_RATES]
        gpus = " / ".join(str(r * plan.tensor_parallel) for r in replicas) if m.hardware == "H100" else "-"
        note = f"; {m.note}" if m.note else ""
        lines.append(f"| {m.model} | {m.hardware} | {m.out_tokens_per_s:,.1f} ({m.source}{note}) "
                     f"| {plan.requests_per_s:.3f} | {plan.tensor_parallel} | {' / '.join(map(str, replicas))} "
                     f"| {gpus} |")
    return lines + [
        "",
        "The GPT-2 rows are batched serving measurements (64 concurrent streams). The gpt-oss rows rest on one "
        "sequence decoding alone, host-bound (bench/NOTES.md, CUDA section), so they are an upper bound on the "
        "hardware needed until batched GPT-OSS serving is measured.",
        "",
    ]
