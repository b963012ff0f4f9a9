"""Loaded CPU weights sit on 2 MiB pages (models/huge_pages.py), where the kernel can collapse them."""

from __future__ import annotations

import pytest
import torch

from models.huge_pages import HUGE_PAGE, collapse_into_huge_pages, huge_page_spans
from models.loader import load_model


def anon_huge_bytes_around(address: int) -> int:
    """AnonHugePages of the mapping (from /proc/self/smaps) that holds ``address``."""
    inside = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                start, end = (int(a, 16) for a in head.split("-"))
                inside = start <= address < end
            elif inside and head == "AnonHugePages:":
                return int(line.split()[1]) * 1024
    return 0


def test_spans_are_the_whole_huge_pages_inside_the_merged_extents():
    mb2 = HUGE_PAGE
    assert huge_page_spans([(100, mb2 + 5)]) == []  # no whole huge page inside
    assert huge_page_spans([(1, 3 * mb2 + 1), (3 * mb2, 5 * mb2 - 1)]) == [(mb2, 4 * mb2)]
    assert huge_page_spans([(6 * mb2, 8 * mb2), (0, 2 * mb2)]) == [(0, 2 * mb2), (6 * mb2, 8 * mb2)]
    # allocations a header apart, each under a huge page: one span across them
    assert huge_page_spans([(mb2 - 64, 2 * mb2 - 32), (2 * mb2 - 16, 3 * mb2 + 7)]) == [(mb2, 3 * mb2)]


def test_loaded_weights_are_backed_by_huge_pages(tiny_gpt2_dir):
    scratch = torch.ones(8 * HUGE_PAGE // 4)
    if collapse_into_huge_pages([scratch]) == 0:
        pytest.skip("this kernel does not collapse memory into huge pages (MADV_COLLAPSE needs Linux 6.1+ and THP)")
    model = load_model(tiny_gpt2_dir, dtype="float32", device="cpu", cpu_weight_dtype="bfloat16").model
    packed = model.lm_head.packed  # the tied unembedding rounded to bf16 at load, 50257 x 64: 6.4 MB
    assert packed.numel() * packed.element_size() > 3 * HUGE_PAGE
    assert anon_huge_bytes_around(packed.data_ptr() + HUGE_PAGE) >= HUGE_PAGE
