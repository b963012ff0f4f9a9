"""bf16 compute on CPU (``--dtype bfloat16``) and the ISA rule behind ``--dtype auto`` (models/cpu_isa.py).

Each path is held against transformers on the same weights. bf16 rounds every op's output to 8 significant
bits, and two correct bf16 implementations round at different points, so they do not agree to fp32
tolerance; the test instead asks that ours stray from the fp32 oracle no further than transformers' own bf16
model does (with a margin for the different rounding points), and stay close to that bf16 model.
"""

from __future__ import annotations

import random

import pytest
import torch

import models.bf16_dot_linear
import models.loader
import models.mxfp4
import models.onednn_linear
from models.bf16_dot_linear import Bf16DotLinear
from models.bf16_weight_linear import Bf16WeightLinear
from models.cpu_isa import CpuIsa, cpu_isa, cpuinfo_flags
from models.forward_batch import ForwardBatch
from models.kv_cache import PagedKVCache
from models.loader import load_model, resolve_dtype
from models.onednn_linear import OneDNNLinear, onednn_usable
from tests.test_gpt_oss import checkpoint_dir, oracle, oracle_logits, random_tokens  # noqa: F401

AMX = CpuIsa(amx_bf16=True, avx512_bf16=True, avx512=True, avx2=True)
ZEN4 = CpuIsa(avx512_bf16=True, avx512=True, avx2=True)
AVX512 = CpuIsa(avx512=True, avx2=True)
AVX2 = CpuIsa(avx2=True)
CPU = torch.device("cpu")
# How much further than transformers' bf16 model ours may stray from the fp32 logits (mean abs difference).
MARGIN = 1.5
BLOCK = 4

native_bf16 = pytest.mark.skipif(not cpu_isa().native_bf16, reason=f"bf16 oneDNN path needs AMX-BF16 or "
                                 f"AVX512-BF16; this CPU has {cpu_isa()}")


def fake_isa(monkeypatch: pytest.MonkeyPatch, isa: CpuIsa) -> None:
    for module in (models.loader, models.onednn_linear, models.bf16_dot_linear, models.mxfp4):
        monkeypatch.setattr(module, "cpu_isa", lambda: isa)


def test_isa_is_read_from_the_kernel_cpu_flags():
    text = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 amx_tile amx_bf16\n\nprocessor\t: 1\n"
    assert CpuIsa.from_flags(cpuinfo_flags(text)) == AMX
    assert CpuIsa.from_flags({"avx2", "avx512f", "avx512_bf16"}) == ZEN4
    assert CpuIsa.from_flags({"avx2", "amx_bf16"}) == AVX2  # no tile registers: no AMX
    assert str(ZEN4) == "AVX512-BF16, AVX-512, AVX2"


@pytest.mark.parametrize("isa,expected", [(AMX, torch.bfloat16), (ZEN4, torch.bfloat16), (AVX512, torch.float32),
                                          (AVX2, torch.float32), (CpuIsa(), torch.float32)])
def test_auto_dtype_on_cpu_is_bf16_only_where_measured_faster(monkeypatch, isa, expected):
    fake_isa(monkeypatch, isa)
    assert resolve_dtype("auto", CPU) == expected
    assert resolve_dtype("float32", CPU) == torch.float32  # the exact path stays available everywhere
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16


@pytest.mark.parametrize("isa,bf16_onednn", [(AMX, True), (ZEN4, True), (AVX512, False), (AVX2, False)])
def test_bf16_goes_through_onednn_only_where_the_cpu_has_bf16_dot_products(monkeypatch, isa, bf16_onednn):
    fake_isa(monkeypatch, isa)
    assert onednn_usable(CPU, torch.bfloat16) == bf16_onednn
    assert onednn_usable(CPU, torch.float32)


def gpt2_oracles(tiny_gpt2_dir):
    from transformers import GPT2LMHeadModel

    fp32 = GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir, attn_implementation="eager", dtype=torch.float32).eval()
    bf16 = GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir, attn_implementation="eager", dtype=torch.bfloat16).eval()
    return fp32, bf16


def assert_as_close_as_transformers_bf16(ours: torch.Tensor, fp32: torch.Tensor, bf16: torch.Tensor) -> None:
    assert ours.dtype == torch.float32 and torch.isfinite(ours).all()
    theirs_error = (bf16.float() - fp32).abs().mean().item()
    assert (ours - fp32).abs().mean().item() <= MARGIN * theirs_error
    assert (ours - bf16.float()).abs().mean().item() <= 2 * MARGIN * theirs_error


PATHS = ["plain", "onednn", "dots"]
LINEAR_TYPES = {"plain": torch.nn.Linear, "onednn": OneDNNLinear, "dots": Bf16DotLinear}


def gpt2_path(monkeypatch, path: str) -> None:
    """``plain``: torch's own bf16 matmuls (a CPU without bf16 dot products); ``onednn``: oneDNN's, as on an AMX
    CPU; ``dots``: the vdpbf16ps kernel, as on an AVX512-BF16 CPU without AMX. Each native path runs on this
    CPU's own instructions, where it has them."""
    if path == "plain":
        return fake_isa(monkeypatch, AVX2)
    if path == "dots" and not cpu_isa().avx512_bf16:
        pytest.skip(f"the bf16 dots kernel needs AVX512-BF16; this CPU has {cpu_isa()}")
    if not cpu_isa().native_bf16:
        pytest.skip(f"bf16 oneDNN path needs AMX-BF16 or AVX512-BF16; this CPU has {cpu_isa()}")
    fake_isa(monkeypatch, AMX if path == "onednn" else ZEN4)


@torch.inference_mode()
def teacher_forced_logits(model, sequences: list[list[int]], decoded: int,
                          cache_dtype: torch.dtype = torch.bfloat16) -> list[torch.Tensor]:
    """Logits at every position of each sequence: one batched prefill of all but the last ``decoded`` tokens,
    then ``decoded`` batched decode steps of one token per sequence (through the paged decode kernels)."""
    blocks = [-(-len(seq) // BLOCK) for seq in sequences]
    cache = PagedKVCache(model.kv_cache_spec(), sum(blocks), BLOCK, dtype=cache_dtype)
    tables = [list(range(sum(blocks[:i]), sum(blocks[: i + 1]))) for i in range(len(sequences))]
    steps = [[seq[:-decoded] for seq in sequences]] + [[[seq[i]] for seq in sequences] for i in range(-decoded, 0)]
    starts = [0] * len(sequences)
    rows: list[list[torch.Tensor]] = [[] for _ in sequences]
    for tokens in steps:
        batch = ForwardBatch.build(tokens, starts, tables, BLOCK)
        for i, part in enumerate(model.compute_logits(model(batch, cache)).split([len(t) for t in tokens])):
            rows[i].append(part)
        starts = [start + len(t) for start, t in zip(starts, tokens)]
    return [torch.cat(r) for r in rows]


@pytest.mark.parametrize("path", PATHS)
def test_gpt2_bf16_prefill_and_batched_decode_stay_as_close_as_transformers_bf16(monkeypatch, tiny_gpt2_dir, path):
    gpt2_path(monkeypatch, path)
    model = load_model(tiny_gpt2_dir, dtype="bfloat16", device="cpu").model
    assert model.wte(torch.tensor([0])).dtype == torch.bfloat16
    assert type(model.h[0].mlp.c_fc) is LINEAR_TYPES[path]
    fp32, bf16 = gpt2_oracles(tiny_gpt2_dir)
    rng = random.Random(0)
    sequences = [[rng.randrange(50257) for _ in range(n)] for n in (12, 37, 60)]
    decoded = 8
    for seq, ours in zip(sequences, teacher_forced_logits(model, sequences, decoded)):
        with torch.no_grad():
            ids = torch.tensor([seq])
            theirs_fp32, theirs_bf16 = fp32(ids).logits[0], bf16(ids).logits[0]
        for part in (slice(None, -decoded), slice(-decoded, None)):  # prefill rows, then decode rows
            assert_as_close_as_transformers_bf16(ours[part], theirs_fp32[part], theirs_bf16[part])


@native_bf16
def test_bf16_model_logits_are_fp32_sums_over_bf16_values(tiny_gpt2_dir):
    model = load_model(tiny_gpt2_dir, dtype="bfloat16", device="cpu").model
    assert isinstance(model.lm_head, Bf16WeightLinear)
    hidden = torch.randn(3, model.config.n_embd).to(torch.bfloat16)
    table = model.wte(torch.arange(model.config.vocab_size))  # the tied matrix, in bf16
    expected = hidden.double() @ table.double().T
    torch.testing.assert_close(model.compute_logits(hidden).double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("path", PATHS)
def test_gpt_oss_bf16_with_mxfp4_experts_stays_as_close_as_transformers_bf16(
        monkeypatch, checkpoint_dir, oracle, path, packed):  # noqa: F811
    gpt2_path(monkeypatch, path)
    model = load_model(checkpoint_dir, dtype="bfloat16", device="cpu", keep_experts_packed=packed).model
    assert model.layers[0].moe.experts.packed == packed
    assert type(model.layers[0].attn.qkv) is LINEAR_TYPES[path]
    bf16 = type(oracle)(oracle.config)
    bf16.load_state_dict(oracle.state_dict())
    bf16 = bf16.to(torch.bfloat16).eval()
    # 40: beyond the sliding window; 120: ~60 rows per expert (8 experts, top-4), so prefill experts take the
    # path's many-row product (a bf16 GEMM on dequantized weights, or the dots decoding them group by group)
    # and decode ones the MXFP4 kernel (models/mxfp4.py)
    sequences = [random_tokens(n, seed=n) for n in (9, 40, 120)]
    decoded = 4
    for seq, ours in zip(sequences, teacher_forced_logits(model, sequences, decoded)):
        theirs_fp32, theirs_bf16 = oracle_logits(oracle, seq), oracle_logits(bf16, seq)
        for part in (slice(None, -decoded), slice(-decoded, None)):  # prefill rows, then decode rows (sinks)
            assert_as_close_as_transformers_bf16(ours[part], theirs_fp32[part], theirs_bf16[part])


@pytest.mark.parametrize("path", ["onednn", "dots"])
@torch.inference_mode()
def test_gpt_oss_bf16_prefill_experts_take_the_many_row_product_and_decode_the_packed_kernel(
        monkeypatch, checkpoint_dir, path):  # noqa: F811
    """A prompt's ~60 rows an expert: with AMX, oneDNN's GEMM on the expert dequantized to bf16; with the dots
    only, the dots on the expert decoded a group at a time, never dequantized whole. One decode row an expert:
    the MXFP4 kernel, which reads the packed bytes, on either."""
    gpt2_path(monkeypatch, path)
    model = load_model(checkpoint_dir, dtype="bfloat16", device="cpu", keep_experts_packed=True).model
    dequantized: list[torch.dtype] = []
    real = models.mxfp4.dequantized
    monkeypatch.setattr(models.mxfp4, "dequantized", lambda b, s, dtype: dequantized.append(dtype) or real(b, s, dtype))
    decoded_by_groups: list[int] = []
    real_dots = torch.ops.gptserve.mxfp4_dot_linear
    monkeypatch.setattr(torch.ops.gptserve, "mxfp4_dot_linear",
                        lambda x, *args: decoded_by_groups.append(len(x)) or real_dots(x, *args))
    seq = random_tokens(120, seed=1)
    cache = PagedKVCache(model.kv_cache_spec(), -(-len(seq) // BLOCK), BLOCK, dtype=torch.bfloat16)
    table = list(range(cache.num_blocks))
    model(ForwardBatch.build([seq[:-1]], [0], [table], BLOCK), cache)
    if path == "onednn":
        assert dequantized and set(dequantized) == {torch.bfloat16} and not decoded_by_groups
    else:
        assert decoded_by_groups and min(decoded_by_groups) > models.mxfp4.BF16_KERNEL_MAX_ROWS and not dequantized
    dequantized.clear()
    decoded_by_groups.clear()
    model(ForwardBatch.build([seq[-1:]], [len(seq) - 1], [table], BLOCK), cache)
    assert not dequantized and not decoded_by_groups


def test_bf16_load_keeps_torch_matmuls_where_bf16_is_emulated(monkeypatch, tiny_gpt2_dir):
    fake_isa(monkeypatch, AVX2)
    half = load_model(tiny_gpt2_dir, dtype="bfloat16", device="cpu").model
    assert half.lm_head is None and not isinstance(half.h[0].mlp.c_fc, OneDNNLinear)
    assert half.compute_logits(torch.zeros(1, half.config.n_embd, dtype=torch.bfloat16)).dtype == torch.float32


def test_bf16_weights_flag_keeps_auto_at_float32_where_auto_would_be_bf16(monkeypatch, tiny_gpt2_dir):
    fake_isa(monkeypatch, AMX)
    loaded = load_model(tiny_gpt2_dir, device="cpu", cpu_weight_dtype="bfloat16")
    assert loaded.dtype == torch.float32 and isinstance(loaded.model.lm_head, Bf16WeightLinear)


@native_bf16
def test_bf16_gpt2_holds_its_tied_embedding_once(tiny_gpt2_dir):
    """The lookups read the logits layer's packed rows, in bf16: no second table of vocab x n_embd."""
    from transformers import GPT2LMHeadModel

    model = load_model(tiny_gpt2_dir, dtype="bfloat16", device="cpu").model
    assert isinstance(model.lm_head, Bf16WeightLinear) and model.wte.weight is None
    vocab_bytes = model.config.vocab_size * model.config.n_embd * 2
    assert sum(t.numel() * t.element_size() for t in model.state_dict().values()) < 1.5 * vocab_bytes
    ids = torch.tensor([[0, 7, 50256, 7]])
    expected = GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir).transformer.wte.weight[ids].bfloat16()
    assert torch.equal(model.wte(ids), expected)
