"""After loading, the checkpoint's mapped pages that the model does not view are no longer resident
(models/mapped_pages.py): a served GPT-OSS kept its converted unembedding and attention weights twice in RSS."""

from __future__ import annotations

from pathlib import Path
from typing import cast

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from models.gpt_oss import GptOss
from models.loader import load_model
from models.mapped_pages import PAGE, release_unviewed_pages, unviewed_ranges
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

