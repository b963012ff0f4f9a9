"""docs/scaling.md is exactly what bench/scaling_table.py computes from the real gpt-oss configs."""

from __future__ import annotations

from bench.scaling_table import DOC, render


def test_scaling_document_is_the_scripts_output():
    assert DOC.read_text() == render(), "docs/scaling.md is stale: run python -m bench.scaling_table"


def test_scaling_document_agrees_with_the_published_sizes_at_one_gpu():
    # gpt-oss-20b: 12.8 GiB with MXFP4 experts (models/mxfp4.py's table); KV: 2 x 24 layers x 8 heads x 64 x 2 B.
    row = next(line for line in render().splitlines() if line.startswith("| 1 | 32 |"))
    assert "| 12.8 | 39.0 |" in row
    assert f"| {2 * 24 * 8 * 64 * 2 * 1000 / 2**20:.1f} |" in row
