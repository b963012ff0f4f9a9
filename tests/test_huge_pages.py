"""Loaded CPU weights sit on 2 MiB pages (models/huge_pages.py): collapsed where the kernel can, and the views
of the checkpoint file, which it cannot collapse, copied onto them."""

from __future__ import annotations

from pathlib import Path
from typing import cast

import pytest
import torch
from safetensors import safe_open

from models.gpt_oss import GptOss
from models.huge_pages import HUGE_PAGE, collapse_into_huge_pages, huge_page_empty, huge_page_spans
from models.loader import load_model
from models.mapped_pages import file_mappings, mapping_viewed
from models.testing.gpt_oss_checkpoint import write_tiny_gpt_oss
from tests.test_mapped_pages import resident_checkpoint_bytes


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


def kernel_collapses() -> bool:
    """Whether MADV_COLLAPSE moves memory onto huge pages here (Linux 6.1+ with THP)."""
    return collapse_into_huge_pages([torch.ones(8 * HUGE_PAGE // 4)]) > 0


NO_COLLAPSE = "this kernel does not collapse memory into huge pages (MADV_COLLAPSE needs Linux 6.1+ and THP)"


def test_loaded_weights_are_backed_by_huge_pages(tiny_gpt2_dir):
    if not kernel_collapses():
        pytest.skip(NO_COLLAPSE)
    model = load_model(tiny_gpt2_dir, dtype="float32", device="cpu", cpu_weight_dtype="bfloat16").model
    packed = model.lm_head.packed  # the tied unembedding rounded to bf16 at load, 50257 x 64: 6.4 MB
    assert packed.numel() * packed.element_size() > 3 * HUGE_PAGE
    assert anon_huge_bytes_around(packed.data_ptr() + HUGE_PAGE) >= HUGE_PAGE


def views_the_file(tensor: torch.Tensor, directory: Path) -> bool:
    return mapping_viewed(tensor, file_mappings(directory)) is not None


def test_a_huge_page_buffer_starts_on_a_huge_page():
    buffer = huge_page_empty(3 * HUGE_PAGE + 5)
    assert buffer.data_ptr() % HUGE_PAGE == 0 and buffer.numel() == 3 * HUGE_PAGE + 5 and buffer.dtype == torch.uint8


def test_packed_experts_leave_the_file_for_huge_pages_and_the_embedding_stays_a_view(tmp_path):
    """The packed experts, views of the file as safetensors maps it (private and writable: MADV_COLLAPSE refuses
    it), are copied into memory of their own on huge pages, with the same bytes, and their file pages leave the
    process. The embedding, of which a token reads one row, stays a view of the file, not resident."""
    # 8.4 MB of gate_up blocks a layer: several whole huge pages each
    directory = write_tiny_gpt_oss(tmp_path, hidden_size=512, intermediate_size=1024, num_local_experts=16)
    model = cast(GptOss, load_model(directory, device="cpu", keep_experts_packed=True, dtype="bfloat16").model)
    packed = {f"model.layers.{i}.mlp.experts.{part}_proj_{kind}": getattr(moe.experts, f"{part}_{kind}")
              for i, moe in enumerate(model.moes) for part in ("gate_up", "down") for kind in ("blocks", "scales")}
    assert not any(views_the_file(tensor, directory) for tensor in packed.values())
    assert views_the_file(model.embedding.weight, directory)
    embedding_bytes = model.embedding.weight.numel() * model.embedding.weight.element_size()
    assert resident_checkpoint_bytes(directory) < embedding_bytes // 4
    for shard in directory.glob("*.safetensors"):
        with safe_open(shard, framework="pt") as stored:
            for name in set(packed) & set(stored.keys()):
                assert torch.equal(packed[name], stored.get_tensor(name).view(packed[name].shape)), name
    if not kernel_collapses():
        pytest.skip(f"the rest needs huge pages: {NO_COLLAPSE}")
    assert anon_huge_bytes_around(model.moes[0].experts.gate_up_blocks.data_ptr()) >= 3 * HUGE_PAGE
