"""After loading, the checkpoint's mapped pages that the model does not view are no longer resident
(models/mapped_pages.py): a served GPT-OSS kept its converted unembedding and attention weights twice in RSS."""

from __future__ import annotations

import ctypes
import os
import time
from pathlib import Path
from typing import cast

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from models.gpt_oss import GptOss
from models.loader import embedding_tables, load_model
from models.mapped_pages import PAGE, read_ahead_views, release_unviewed_pages, unviewed_ranges
from models.testing.gpt_oss_checkpoint import TINY_CONFIG, write_tiny_gpt_oss

MIB = 1 << 20


def resident_checkpoint_bytes(directory: Path) -> int:
    """Resident bytes of this process's mappings of ``*.safetensors`` files in ``directory``."""
    prefix, total, counting = str(directory.resolve()) + "/", 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if not fields[0].endswith(":"):  # a mapping's header line, then its "Key: value" lines
                path = fields[5] if len(fields) > 5 else ""
                counting = path.startswith(prefix) and path.endswith(".safetensors")
            elif counting and fields[0] == "Rss:":
                total += int(fields[1]) * 1024
    return total


def test_a_page_shared_with_a_view_is_kept_and_the_rest_released() -> None:
    mapping = (0, 10 * PAGE)
    assert unviewed_ranges(mapping, [(PAGE + 5, 2 * PAGE + 1)]) == [(0, PAGE), (3 * PAGE, 10 * PAGE)]
    assert unviewed_ranges(mapping, [(0, 4 * PAGE), (2 * PAGE, 10 * PAGE)]) == []
    assert unviewed_ranges(mapping, [(20 * PAGE, 30 * PAGE)]) == [mapping]


def test_converted_tensors_leave_rss_and_viewed_ones_keep_their_values(tmp_path: Path) -> None:
    """A view written in place (copy-on-write) keeps its values: only pages no tensor views are dropped."""
    save_file({"converted": torch.randn(2 * MIB // 4), "kept": torch.randn(2 * MIB // 4)},
              tmp_path / "model.safetensors")
    with safe_open(tmp_path / "model.safetensors", framework="pt") as f:
        kept = f.get_tensor("kept")
        module = nn.Module()
        module.register_buffer("converted", f.get_tensor("converted").to(torch.bfloat16))
    module.register_buffer("kept", kept)
    kept[:3] = torch.tensor([1.0, 2.0, 3.0])
    expected = kept.clone()
    assert resident_checkpoint_bytes(tmp_path) >= 4 * MIB
    release_unviewed_pages(module, tmp_path)
    assert resident_checkpoint_bytes(tmp_path) <= 2 * MIB + 2 * PAGE
    assert torch.equal(kept, expected)


@pytest.mark.parametrize("packed,weights", [(True, "bfloat16"), (False, "bfloat16"), (True, "float32")],
                         ids=["served-flags", "float-experts", "float32-onednn"])
def test_loading_leaves_no_converted_checkpoint_pages_resident(tmp_path: Path, packed: bool, weights: str) -> None:
    """With the served flags the unembedding (here 25 MB) is repacked and the embedding and packed experts are
    views; in float32 the linears become oneDNN's blocked tensors, which view no file."""
    directory = write_tiny_gpt_oss(tmp_path)
    loaded = load_model(directory, device="cpu", keep_experts_packed=packed, cpu_weight_dtype=weights)
    unembedding_bytes = TINY_CONFIG["vocab_size"] * TINY_CONFIG["hidden_size"] * 2
    assert resident_checkpoint_bytes(directory) < unembedding_bytes // 8
    ids = torch.tensor([1, 2, 3])
    assert torch.isfinite(cast(GptOss, loaded.model).embedding(ids)).all()  # the released views read the file again



def page_cache_fraction(tensor: torch.Tensor) -> float:
    """The share of the file pages under ``tensor`` that are in the page cache (mincore), mapped in or not."""
    start = tensor.data_ptr() // PAGE * PAGE
    length = tensor.data_ptr() + tensor.numel() * tensor.element_size() - start
    pages = -(-length // PAGE)
    vector = (ctypes.c_ubyte * pages)()
    mincore = ctypes.CDLL(None, use_errno=True).mincore
    mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    assert mincore(start, length, vector) == 0, ctypes.get_errno()
    return sum(byte & 1 for byte in vector) / pages


def evict_from_page_cache(directory: Path) -> None:
    for path in directory.glob("*.safetensors"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)  # written just now: dirty pages stay in the cache until they are on disk
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def wait_for_page_cache(tensor: torch.Tensor, fraction: float) -> float:
    """The tensor's page cache fraction once it reaches ``fraction`` (read-ahead runs in the background), or
    after 10 s."""
    deadline = time.monotonic() + 10
    while page_cache_fraction(tensor) < fraction and time.monotonic() < deadline:
        time.sleep(0.05)
    return page_cache_fraction(tensor)


def test_loading_reads_the_embedding_ahead_into_the_page_cache_but_not_into_the_process(tmp_path: Path) -> None:
    """A token reads one row of the embedding: the table stays a view of the file, out of RSS, but its pages are
    read into the page cache at load, so a new token's row is not a disk read inside a decode step."""
    directory = write_tiny_gpt_oss(tmp_path)
    evict_from_page_cache(directory)
    model = cast(GptOss, load_model(directory, device="cpu", keep_experts_packed=True, dtype="bfloat16").model)
    table = model.embedding.weight
    assert wait_for_page_cache(table, 0.9) >= 0.9  # without the read-ahead: ~65%, what the loads around it pulled in
    assert resident_checkpoint_bytes(directory) < table.numel() * table.element_size() // 4
    evict_from_page_cache(directory)
    if page_cache_fraction(table) >= 0.1:
        pytest.skip("this filesystem keeps the file's pages cached whatever is asked (tmpfs, for one)")
    assert read_ahead_views(embedding_tables(model), directory) >= table.numel() * table.element_size()
    assert wait_for_page_cache(table, 0.9) >= 0.9


def test_the_cpu_kernels_are_built_before_any_weight_is_read(tiny_gpt2_dir: Path, monkeypatch) -> None:
    """A first start compiles the C++ kernels: done before the weights are read, the compilers' memory never
    adds to theirs (bench/NOTES.md, session 16)."""
    import models.gpt2
    import models.loader

    events: list[str] = []
    read_weights = models.gpt2.load_gpt2
    monkeypatch.setattr(models.loader, "cpu_kernels_loaded", lambda: events.append("kernels") or True)
    monkeypatch.setattr(models.gpt2, "load_gpt2", lambda *args: events.append("weights") or read_weights(*args))
    load_model(tiny_gpt2_dir, device="cpu")
    assert events[:2] == ["kernels", "weights"]
