"""bfloat16 CPU weights (models/bf16_weight_linear.py): exact fp32 arithmetic on bf16-rounded weights.

The oracle is transformers with the same rounding applied to its weights, so the comparisons keep the fp32
tolerance: the kernel's dots (decode-sized inputs) and the GEMM on widened tiles (larger ones) must both
compute the rounded model, from the one bf16 copy of each weight the model holds.
"""

from __future__ import annotations

import platform
import random
from pathlib import Path

import pytest
import torch
from torch import nn

from models.bf16_weight_linear import KERNEL_MAX_ROWS, Bf16Embedding, Bf16WeightLinear, pack_bf16_weight
from models.cpu_isa import cpu_isa
from models.cpu_kernels import cpu_kernels_loaded
from models.generation import greedy_generate, prompt_logits
from models.gpt2 import load_gpt2
from models.gpt_oss import load_gpt_oss
from models.loader import load_model
from tests.test_gpt_oss import checkpoint_dir, full_forward, oracle, oracle_logits, random_tokens  # noqa: F401

ATOL = 1e-4


@pytest.fixture(scope="module", autouse=True)
def kernels():
    if not cpu_kernels_loaded():
        pytest.fail("the C++ CPU kernels did not build (g++ and ninja are test requirements)")


def rounded(module: nn.Module) -> nn.Module:
    for param in module.parameters():
        param.data = param.data.to(torch.bfloat16).float()
    return module


def kernel_paths() -> list:
    """Each way the kernel multiplies: its dots on each instruction set (those this CPU lacks skipped, with
    the reason), and the GEMM on widened tiles."""
    isa = cpu_isa()
    paths = []
    for name, present in (("avx512", isa.avx512), ("avx2", isa.avx2), ("portable", True)):
        skip = [] if present else [pytest.mark.skip(reason=f"this CPU has no {name}")]
        paths.append(pytest.param(("dots", name), id=f"dots-{name}", marks=skip))
    return [*paths, pytest.param(("tiles", ""), id="tiles")]


def multiply(path: tuple[str, str], x, packed, bias, n):
    op, isa = path
    if op == "tiles":
        return torch.ops.gptserve.bf16_linear_tiles(x, packed, bias, n)
    return torch.ops.gptserve.bf16_linear(x, packed, bias, n, isa)


@pytest.mark.parametrize("path", kernel_paths())
@pytest.mark.parametrize("rows,out_features,in_features",
                         [(1, 100, 64), (3, 77, 65), (4, 2304, 768), (9, 16, 3072), (13, 104, 96), (70, 300, 33),
                          (5, 1500, 3000)])  # the last: two widened tiles, the second partial
def test_kernel_matches_fp32_product_on_rounded_weights(path, rows, out_features, in_features):
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, in_features, generator=gen)
    weight = torch.randn(out_features, in_features, generator=gen)
    bias = torch.randn(out_features, generator=gen)
    packed = pack_bf16_weight(weight)
    exact = weight.to(torch.bfloat16).float()
    for b in (bias, None):
        got = multiply(path, x, packed, b, out_features)
        expected = x.double() @ exact.double().T + (0 if b is None else b.double())
        scale = x.abs().double() @ exact.abs().double().T  # bound on the fp32 rounding of the sums
        assert ((got.double() - expected).abs() <= 1e-6 * scale + 1e-6).all()


@pytest.mark.parametrize("path", kernel_paths())
def test_kernel_takes_an_input_of_no_rows(path):
    packed = pack_bf16_weight(torch.randn(40, 24))
    for bias in (torch.randn(40), None):
        assert multiply(path, torch.empty(0, 24), packed, bias, 40).shape == (0, 40)


def test_vector_dots_give_every_row_the_same_bits_whatever_the_batch_and_instruction_set():
    isa = cpu_isa()
    if not isa.avx2:
        pytest.skip("this CPU has no AVX2")
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(29, 97, generator=gen)  # 29 rows: passes of 10 / 10 / 9 on AVX-512, of 2 and 1 on AVX2
    weight = torch.randn(50, 97, generator=gen)  # 50 outputs: two groups, the last partial; K odd
    packed = pack_bf16_weight(weight)
    paths = ["avx2", *(["avx512"] if isa.avx512 else [])]
    for path in paths:
        batch = torch.ops.gptserve.bf16_linear(x, packed, None, 50, path)
        alone = torch.cat([torch.ops.gptserve.bf16_linear(x[i : i + 1], packed, None, 50, path) for i in range(29)])
        assert torch.equal(batch, alone)
        assert torch.equal(batch, torch.ops.gptserve.bf16_linear(x, packed, None, 50, paths[0]))


def cpu_vendor() -> str | None:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    return next((line.partition(":")[2].strip() for line in text.splitlines() if line.startswith("vendor_id")), None)


def test_streamed_weights_are_prefetched_into_l2_on_intel_and_non_temporally_elsewhere():
    """Intel's non-temporal prefetch bypasses L2: with it both bf16 kernels read 10-19 GB/s on a Xeon whose plain
    read ran at 24-27, and with T1 25-31 (bench/NOTES.md, session 15). AMD keeps the hint it was measured with."""
    vendor = cpu_vendor()
    if platform.machine() != "x86_64" or vendor is None:
        pytest.skip("the prefetch hints are x86's, chosen by the vendor /proc/cpuinfo names")
    expected = "into_l2" if vendor == "GenuineIntel" else "non_temporal"
    assert torch.ops.gptserve.stream_hint() == expected


def test_packing_rounds_to_nearest_even_like_torch():
    values = torch.tensor([1.0, 1.00390625, 1.01171875, -2.0078125, 3.0e38, 1e-40, float("inf"), -float("inf")])
    weight = values.repeat(3, 1)
    packed = pack_bf16_weight(weight)  # [1, 4, 32, 2]: lane j holds output row j, inputs 2p and 2p + 1 in pair p
    expected = values.to(torch.bfloat16).view(torch.int16)
    assert torch.equal(packed[0, :, 0].flatten(), expected)
    assert torch.equal(packed[0, :, 3:], torch.zeros(4, 29, 2, dtype=torch.int16))  # padding lanes
    odd = pack_bf16_weight(weight[:, :7])  # an odd number of inputs: the last pair's second one is zero
    assert odd.shape == (1, 4, 32, 2) and odd[0, 3, 0, 1] == 0


def test_layer_gives_the_same_rows_for_many_rows_and_few():
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(1000, 48, generator=gen)
    layer = Bf16WeightLinear(weight, torch.randn(1000, generator=gen))
    exact = weight.to(torch.bfloat16).float() @ torch.eye(48)  # an fp32 matmul over the rounded weights
    x = torch.randn(KERNEL_MAX_ROWS + 3, 48, generator=gen)
    big = layer(x)  # many rows: the tiles, or on AVX-512 the dots
    small = torch.cat([layer(x[i : i + 5]) for i in range(0, len(x), 5)])  # the dots, five rows at a time
    torch.testing.assert_close(small, big, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(big, x @ exact.T + layer.bias, rtol=1e-5, atol=1e-5)
    ids = torch.tensor([[0, 7, 8], [999, 500, 3]])
    torch.testing.assert_close(layer.weight_rows(ids.flatten()), exact[ids.flatten()], rtol=0, atol=0)


def held_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer but the MXFP4 experts' (kept packed as they are), each storage once."""
    held: dict[int, tuple[str, torch.Tensor]] = {}
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if ".experts." not in name:
            held.setdefault(tensor.untyped_storage().data_ptr(), (name, tensor))
    return dict(held.values())


def assert_each_weight_held_once_in_bf16(model: nn.Module, reference: nn.Module) -> None:
    """Every matrix of ``reference`` (the same checkpoint in fp32) is held once, in bf16 (int16 bits when
    packed): fp32 tensors are vectors (biases, norms, sinks), and the bf16 bytes are two a weight."""
    held, weights = held_tensors(model), held_tensors(reference).values()
    for name, tensor in held.items():
        assert tensor.dtype in (torch.float32, torch.bfloat16, torch.int16), name
        assert tensor.dtype != torch.float32 or tensor.dim() == 1, f"{name}: an fp32 matrix {tuple(tensor.shape)}"
    nbytes = {dtype: sum(t.untyped_storage().nbytes() for t in held.values() if t.dtype == dtype)
              for dtype in (torch.float32, torch.bfloat16, torch.int16)}
    assert nbytes[torch.float32] == 4 * sum(t.numel() for t in weights if t.dim() == 1)
    matrix_bytes = 2 * sum(t.numel() for t in weights if t.dim() == 2)
    padding = 2 * 8 * 4096  # packed groups round each matrix's outputs up to a multiple of 8
    assert matrix_bytes <= nbytes[torch.bfloat16] + nbytes[torch.int16] <= matrix_bytes + padding


@pytest.fixture(scope="module")
def gpt2(tiny_gpt2_dir):
    return load_model(tiny_gpt2_dir, dtype="float32", device="cpu", cpu_weight_dtype="bfloat16").model


@pytest.fixture(scope="module")
def gpt2_oracle(tiny_gpt2_dir):
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir, attn_implementation="eager", dtype=torch.float32)
    return rounded(model).eval()


def test_gpt2_layers_stream_bf16_copies(gpt2):
    assert isinstance(gpt2.h[0].attn.c_attn, Bf16WeightLinear) and isinstance(gpt2.lm_head, Bf16WeightLinear)
    assert gpt2.lm_head.packed.dtype == torch.int16
    assert isinstance(gpt2.wte, Bf16Embedding) and gpt2.wte.weight is None  # tied: read from lm_head's rows


def test_gpt2_with_bf16_weights_holds_each_weight_once(gpt2, tiny_gpt2_dir):
    assert_each_weight_held_once_in_bf16(gpt2, load_gpt2(tiny_gpt2_dir, torch.float32, "cpu"))


def test_gpt_oss_with_bf16_weights_holds_each_weight_once(checkpoint_dir):  # noqa: F811
    model = load_model(checkpoint_dir, dtype="float32", device="cpu", keep_experts_packed=True,
                       cpu_weight_dtype="bfloat16").model
    assert model.layers[0].moe.experts.packed
    assert_each_weight_held_once_in_bf16(model, load_gpt_oss(checkpoint_dir, torch.float32, "cpu", True))


def test_gpt2_prompt_logits_and_greedy_decoding_match_the_rounded_oracle(gpt2, gpt2_oracle):
    rng = random.Random(0)
    prompts = [[rng.randrange(50257) for _ in range(n)] for n in (3, 40)]
    with torch.no_grad():
        expected = gpt2_oracle(torch.tensor([prompts[1]])).logits[0]
    [ours] = prompt_logits(gpt2, [prompts[1]])  # 40 rows: the kernel's dots
    assert (ours - expected).abs().max().item() <= ATOL
    long_prompt = [rng.randrange(50257) for _ in range(120)]
    with torch.no_grad():
        long_expected = gpt2_oracle(torch.tensor([long_prompt])).logits[0]
    ours, long_ours = prompt_logits(gpt2, [prompts[1], long_prompt])  # 160 rows: tiles where no AVX-512
    assert (ours - expected).abs().max().item() <= ATOL
    assert (long_ours - long_expected).abs().max().item() <= ATOL
    generated = greedy_generate(gpt2, prompts, max_new_tokens=24)  # decode steps of 2 rows: the bf16 kernel
    for prompt, got in zip(prompts, generated):
        reference = gpt2_oracle.generate(torch.tensor([prompt]), max_new_tokens=24, min_new_tokens=24,
                                         do_sample=False, pad_token_id=50256)
        assert got == reference[0, len(prompt) :].tolist()


def test_gpt_oss_logits_match_the_rounded_oracle(checkpoint_dir, oracle):  # noqa: F811
    model = load_model(checkpoint_dir, dtype="float32", device="cpu", cpu_weight_dtype="bfloat16").model
    assert isinstance(model.layers[0].attn.qkv, Bf16WeightLinear)
    rounded(oracle)
    ids = random_tokens(KERNEL_MAX_ROWS + 8, seed=3)
    for n in (len(ids), 5):  # many rows (the tiles where no AVX-512), then few (the dots)
        torch.testing.assert_close(full_forward(model, ids[:n]), oracle_logits(oracle, ids[:n]), rtol=0, atol=ATOL)


def test_bf16_weights_are_refused_where_they_do_not_apply(tiny_gpt2_dir):
    with pytest.raises(ValueError, match="--dtype float32"):
        load_model(tiny_gpt2_dir, dtype="bfloat16", device="cpu", cpu_weight_dtype="bfloat16")
    with pytest.raises(ValueError, match="unknown cpu_weight_dtype"):
        load_model(tiny_gpt2_dir, device="cpu", cpu_weight_dtype="float16")


def test_the_server_flag_loads_bf16_weights_and_is_refused_with_tensor_parallelism(tiny_gpt2_dir):
    from server.cli import load_models, parse_config
    from server.config import ModelLoadConfig, ParallelConfig, ServerConfig

    assert parse_config([]).load.cpu_weight_dtype == "float32"
    config = parse_config(["--model", f"tiny={tiny_gpt2_dir}", "--device", "cpu", "--cpu-weight-dtype", "bfloat16"])
    [loaded] = load_models(config).values()
    assert isinstance(loaded.model.lm_head, Bf16WeightLinear)
    with pytest.raises(ValueError, match="tensor-parallel"):
        load_models(ServerConfig(models=(str(tiny_gpt2_dir),),
                                 load=ModelLoadConfig(device="cpu", cpu_weight_dtype="bfloat16"),
                                 parallel=ParallelConfig(tensor_parallel_size=2)))


def test_bf16_weights_are_read_from_the_checkpoint_in_bf16(tiny_gpt2_dir, checkpoint_dir, monkeypatch):  # noqa: F811
    """No fp32 copy of a matrix exists even while loading: the peak memory of a load is the bf16 model's."""
    from models.checkpoint import Checkpoint

    read = Checkpoint.get
    matrices: list[torch.dtype] = []

    def recording(self, name, shape=None, dtype=None, device=None):
        tensor = read(self, name, shape, dtype, device)
        if tensor.dim() == 2:
            matrices.append(tensor.dtype)
        return tensor

    monkeypatch.setattr(Checkpoint, "get", recording)
    for directory in (tiny_gpt2_dir, checkpoint_dir):
        load_model(directory, dtype="float32", device="cpu", cpu_weight_dtype="bfloat16")
    assert matrices and set(matrices) == {torch.bfloat16}
