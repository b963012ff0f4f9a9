"""One entry point from a checkpoint directory to a ready model and its tokenizer, whatever the family/layout."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from models.bf16_weight_linear import Bf16Embedding, Bf16WeightLinear
from models.checkpoint import CheckpointError, read_json
from models.cpu_isa import cpu_isa
from models.cpu_kernels import cpu_kernels_loaded
from models.deferred_tokenizer import DeferredTokenizer
from models.huge_pages import collapse_into_huge_pages, copy_onto_huge_pages
from models.linear_selection import select_linears
from models.mapped_pages import module_tensors, read_ahead_views, release_unviewed_pages
from models.onednn_linear import onednn_usable
from models.parallel import SINGLE, TensorParallel
from models.servable import ServableModel
from models.tokenizer import TOKENIZER_FILES, Tokenizer, load_tokenizer

if TYPE_CHECKING:
    from models.gpt2 import GPT2
    from models.gpt_oss import GptOss

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: ServableModel
    tokenizer: Tokenizer
    family: str  # "gpt2" | "gpt_oss"
    directory: Path
    dtype: torch.dtype
    device: torch.device
    hidden_size: int  # the width of the final hidden states (an embedding's dimensions)
    tokenizer_dir: Path  # where the tokenizer's files are: the model's folder (or its parent), or --tokenizer's

    @property
    def max_context(self) -> int:
        return self.model.max_context


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` is bfloat16 on GPU; on CPU bfloat16 only where it was measured faster than float32 (see
    models/cpu_isa.py), else float32. ``float32`` always keeps the exact path."""
    if dtype == "auto":
        if device.type == "cpu":
            return torch.bfloat16 if cpu_isa().bf16_faster_than_fp32 else torch.float32
        return torch.bfloat16
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: choose auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def detect_family(config: dict) -> str:
    from models.gpt_oss import is_original_gpt_oss_config

    model_type = config.get("model_type")
    if model_type in ("gpt2", "gpt_oss"):
        return model_type
    if model_type is None and is_original_gpt_oss_config(config):
        return "gpt_oss"
    raise CheckpointError(f"config.json: unknown model_type {model_type!r} (supported: gpt2, gpt_oss)")


def tokenizer_directory(model_dir: Path) -> Path:
    """A GPT-OSS ``original/`` folder may hold no tokenizer: the real repository keeps it in the parent."""
    for candidate in (model_dir, model_dir.parent):
        if any((candidate / name).is_file() for name in TOKENIZER_FILES):
            return candidate
    return model_dir


def round_the_rest_(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Every parameter outside the bf16 layers (norms, biases, sinks, experts' biases) rounded to bf16 like
    the matrices and kept in ``dtype``, which the model computes in (buffers such as rotary tables are
    derived, not loaded, and stay exact)."""
    for module in model.modules():
        if not isinstance(module, (Bf16WeightLinear, Bf16Embedding)):
            for param in module.parameters(recurse=False):
                if param.is_floating_point():
                    param.data = param.data.to(torch.bfloat16).to(dtype)


def streamed_tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    """The tensors a decode step reads whole: all but embedding tables, of which a token reads one row."""
    return [tensor for module in model.modules() if not isinstance(module, (torch.nn.Embedding, Bf16Embedding))
            for tensor in module_tensors(module, recurse=False)]


def embedding_tables(model: torch.nn.Module) -> list[torch.Tensor]:
    """The tensors a token reads one row of."""
    return [tensor for module in model.modules() if isinstance(module, (torch.nn.Embedding, Bf16Embedding))
            for tensor in module_tensors(module, recurse=False)]


def experts_kept_packed(requested: bool | None, device: torch.device) -> bool:
    """Whether GPT-OSS's experts stay MXFP4; None: on CPU, where C++ kernels read them packed in decode steps
    (faster than dequantized weights, which would hold gpt-oss-20b's experts in 71 GiB of float32 or 36 of
    bf16 instead of 9.5), and not elsewhere, where the dequantized experts run torch's grouped GEMMs and CUDA
    graphs capture them."""
    return device.type == "cpu" if requested is None else requested


def load_model(
    path: str | Path,
    dtype: str = "auto",
    device: str = "auto",
    keep_experts_packed: bool | None = False,
    tp: TensorParallel = SINGLE,
    cpu_weight_dtype: str = "float32",
    defer_tokenizer: bool = False,
    tokenizer: str | Path | None = None,
) -> LoadedModel:
    """``cpu_weight_dtype="bfloat16"`` (CPU, float32 only) rounds the weights to bf16 and streams them as bf16
    in decode steps: about half the time per batch-1 step, outputs off the checkpoint's by the rounding.
    ``keep_experts_packed``: GPT-OSS experts kept in MXFP4; None chooses by device (``experts_kept_packed``).
    ``defer_tokenizer``: build the tokenizer's tables only when first used (an engine core, whose front end
    holds and checks the same tokenizer). ``tokenizer``: its folder, when not the model's."""
    model_dir = Path(path)
    if not model_dir.is_dir():
        raise CheckpointError(f"missing file: model directory {model_dir} does not exist")
    family = detect_family(read_json(model_dir / "config.json"))
    torch_device = resolve_device(device)
    if cpu_weight_dtype not in ("float32", "bfloat16"):
        raise ValueError(f"unknown cpu_weight_dtype {cpu_weight_dtype!r}: choose float32 or bfloat16")
    bf16_weights = cpu_weight_dtype == "bfloat16"
    # bf16 weights under fp32 compute is a float32 mode: asking for it settles what auto means
    torch_dtype = torch.float32 if bf16_weights and dtype == "auto" else resolve_dtype(dtype, torch_device)
    if bf16_weights and not (torch_dtype == torch.float32 and onednn_usable(torch_device, torch_dtype)):
        raise ValueError("bfloat16 CPU weights need --device cpu and --dtype float32")
    model = load_weights(model_dir, family, torch_dtype, torch_device, keep_experts_packed, tp, bf16_weights)
    tokenizer_dir = Path(tokenizer) if tokenizer is not None else tokenizer_directory(model_dir)
    built = DeferredTokenizer(tokenizer_dir) if defer_tokenizer else load_tokenizer(tokenizer_dir)
    if built.vocab_size > model.config.vocab_size:
        raise CheckpointError(f"the tokenizer defines {built.vocab_size} token ids but the model's vocabulary "
                              f"has only {model.config.vocab_size}")
    return LoadedModel(model, built, family, model_dir, torch_dtype, torch_device, model.config.hidden_size,
                       tokenizer_dir)


def load_weights(
    model_dir: Path,
    family: str,
    dtype: torch.dtype,
    device: torch.device,
    keep_experts_packed: bool | None = False,
    tp: TensorParallel = SINGLE,
    bf16_weights: bool = False,
) -> GPT2 | GptOss:
    """The model alone (a tensor-parallel worker rank needs no tokenizer): this rank's shard of it.

    With ``bf16_weights`` the checkpoint is read in bf16 (rounded to nearest where it is stored wider), so
    that no fp32 copy of a matrix exists even during the load; what the bf16 layers do not take is rounded
    the same way and then widened."""
    model: GPT2 | GptOss
    read_dtype = torch.bfloat16 if bf16_weights else dtype
    if device.type == "cpu" and dtype in (torch.float32, torch.bfloat16):
        # built (or found built) before any weight is read, not during the first request, and not beside the
        # weights: a first start's compilers (~0.6 GiB each) then add nothing to what the weights hold
        cpu_kernels_loaded()
    if family == "gpt2":
        from models.gpt2 import load_gpt2

        model = load_gpt2(model_dir, read_dtype, device, tp)
    else:
        from models.gpt_oss import load_gpt_oss

        packed = experts_kept_packed(keep_experts_packed, device)
        model = load_gpt_oss(model_dir, read_dtype, device, keep_experts_packed=packed, tp=tp)
    select_linears(model, model.unembedding, device, dtype, bf16_weights)
    if bf16_weights:
        round_the_rest_(model, dtype)
    release_unviewed_pages(model, model_dir)  # what was converted on the way in no longer counts in our RSS
    if device.type == "cpu":  # a decode step streams them all: on huge pages, fewer TLB misses
        # every step reads all of what was converted (attention, unembedding), so it has the first pick of the
        # huge pages; then the views of the file, which cannot collapse, are copied onto them
        collapse_into_huge_pages(module_tensors(model))
        copy_onto_huge_pages(streamed_tensors(model), model_dir)
    read_ahead_views(embedding_tables(model), model_dir)  # a new token's row: a page cache hit, not a disk read
    return model
