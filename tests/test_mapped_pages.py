"""After loading, the checkpoint's mapped pages that the model does not view are no longer resident
(models/mapped_pages.py): a served GPT-OSS kept its converted unembedding and attention weights twice in RSS."""

from __future__ import annotations

import ctypes
import mmap
from pathlib import Path
from typing import cast

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from models.gpt_oss import GptOss
from models.loader import load_model
from models.mapped_pages import MADV_POPULATE_READ, PAGE, libc_madvise, release_unviewed_pages, unviewed_ranges
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


def kernel_populates_mappings() -> bool:
    """Whether this kernel has MADV_POPULATE_READ (Linux 5.14+); older ones only read ahead (MADV_WILLNEED),
    which fills the page cache but maps nothing into the process, so its RSS cannot show the experts."""
    with mmap.mmap(-1, PAGE) as probe:
        address = ctypes.addressof(ctypes.c_char.from_buffer(probe))
        return libc_madvise()(address, PAGE, MADV_POPULATE_READ) == 0


@pytest.mark.skipif(not kernel_populates_mappings(), reason="this kernel has no MADV_POPULATE_READ (Linux < 5.14)")
def test_loading_faults_in_the_packed_experts_but_not_the_embedding_table(tmp_path: Path) -> None:
    """The experts stay views of the file and a decode step reads them whole: mapped in at load time, not page
    by page during the first requests. The embedding, of which a token reads one row, is left on disk."""
    # experts of 3.3 MB a layer: the tiny model's 52 KB are read whole by the kernel's fault-around anyway
    directory = write_tiny_gpt_oss(tmp_path, hidden_size=256, intermediate_size=512, num_local_experts=16)
    model = cast(GptOss, load_model(directory, device="cpu", keep_experts_packed=True, dtype="bfloat16").model)
    experts = [moe.experts for moe in model.moes]
    packed = [t for e in experts for t in (e.gate_up_blocks, e.gate_up_scales, e.down_blocks, e.down_scales)]
    packed_bytes = sum(t.numel() for t in packed)  # uint8
    embedding_bytes = model.embedding.weight.numel() * model.embedding.weight.element_size()
    resident = resident_checkpoint_bytes(directory)
    assert packed_bytes <= resident < packed_bytes + embedding_bytes // 4, (packed_bytes, embedding_bytes, resident)
