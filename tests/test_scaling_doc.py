"""docs/scaling.md is exactly what bench/scaling_table.py computes from the real gpt-oss configs and, for the
capacity plan, from the throughputs in bench/NOTES.md."""

from __future__ import annotations

import math

import pytest

from bench.capacity_plan import NOTES, UTILIZATION, Plan, measurements
from bench.scaling_table import DOC, MODELS, min_tensor_parallel, render


def test_scaling_document_is_the_scripts_output():
    assert DOC.read_text() == render(), "docs/scaling.md is stale: run python -m bench.scaling_table"


def test_scaling_document_agrees_with_the_published_sizes_at_one_gpu():
    # gpt-oss-20b: 12.8 GiB with MXFP4 experts (models/mxfp4.py's table); KV per token past the window: K and V
    # of the 12 full-attention layers (the 12 sliding ones keep only their window) x 8 heads x 64 x 2 B.
    row = next(line for line in render().splitlines() if line.startswith("| 1 | 32 |"))
    assert "| 12.8 | 39.0 |" in row
    assert f"| {2 * 12 * 8 * 64 * 2 * 1000 / 2**20:.1f} |" in row


def test_capacity_plan_takes_each_replicas_rate_from_the_bench_notes():
    notes = NOTES.read_text()
    by_name = {(m.model, m.hardware): m for m in measurements(notes)}
    gpt2 = Plan(by_name["GPT-2 124M", "H100"], tensor_parallel=1)
    assert gpt2.measurement.out_tokens_per_s == 5773.0 and gpt2.measurement.tokens_per_request == 128
    assert gpt2.replicas(100) == math.ceil(100 / (5773.0 / 128 * UTILIZATION))
    halved = notes.replace("| 4,145 | 5,773 |", "| 4,145 | 2,886 |")
    slower = {(m.model, m.hardware): m for m in measurements(halved)}["GPT-2 124M", "H100"]
    assert Plan(slower, 1).replicas(100) > gpt2.replicas(100)


def test_capacity_plan_fails_loudly_when_a_measurement_is_gone():
    notes = NOTES.read_text().replace("| graphs, final |", "| graphs, later |")
    with pytest.raises(ValueError, match="graphs, final"):
        measurements(notes)


def test_gpt_oss_120b_needs_two_gpus_and_20b_one():
    assert {name: min_tensor_parallel(raw) for name, raw in MODELS.items()} == {"gpt-oss-20b": 1, "gpt-oss-120b": 2}
