"""bfloat16 CPU weights (models/bf16_weight_linear.py): exact fp32 arithmetic on bf16-rounded weights.

The oracle is transformers with the same rounding applied to its weights, so the comparisons keep the fp32
tolerance: the kernel (decode-sized inputs) and oneDNN (larger ones) must both compute the rounded model.
"""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

from models.bf16_weight_linear import KERNEL_MAX_ROWS, Bf16WeightLinear, pack_bf16_weight
from models.cpu_kernels import cpu_kernels_loaded
from models.generation import greedy_generate, prompt_logits
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


@pytest.mark.parametrize("rows,out_features,in_features", [(1, 100, 64), (3, 77, 65), (4, 2304, 768), (9, 16, 3072)])
def test_kernel_matches_fp32_product_on_rounded_weights(rows, out_features, in_features):
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, in_features, generator=gen)
    weight = torch.randn(out_features, in_features, generator=gen)
    bias = torch.randn(out_features, generator=gen)
    packed = pack_bf16_weight(weight)
    exact = weight.to(torch.bfloat16).float()
    for b in (bias, None):
        got = torch.ops.gptserve.bf16_linear(x, packed, b, out_features)
        expected = x.double() @ exact.double().T + (0 if b is None else b.double())
        scale = x.abs().double() @ exact.abs().double().T  # bound on the fp32 rounding of the sums
        assert ((got.double() - expected).abs() <= 1e-6 * scale + 1e-6).all()


def test_packing_rounds_to_nearest_even_like_torch():
    values = torch.tensor([1.0, 1.00390625, 1.01171875, -2.0078125, 3.0e38, 1e-40, float("inf"), -float("inf")])
    weight = values.repeat(3, 1)
    packed = pack_bf16_weight(weight)  # [1, 8, 8]: lane j holds output row j
    expected = values.to(torch.bfloat16).view(torch.int16)
    assert torch.equal(packed[0, :, 0], expected)
    assert torch.equal(packed[0, :, 3:], torch.zeros(8, 5, dtype=torch.int16))  # padding lanes


def test_layer_gives_the_same_rows_on_either_path():
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(96, 48, generator=gen).to(torch.bfloat16).float()
    layer = Bf16WeightLinear(weight, torch.randn(96, generator=gen))
    x = torch.randn(KERNEL_MAX_ROWS + 3, 48, generator=gen)
    gemm_inputs = []
    layer.gemm.register_forward_hook(lambda module, args, out: gemm_inputs.append(len(args[0])))
    big = layer(x)  # oneDNN
    small = torch.cat([layer(x[i : i + 1]) for i in range(len(x))])  # the bf16 kernel, a row at a time
    assert gemm_inputs == [KERNEL_MAX_ROWS + 3]
    torch.testing.assert_close(small, big, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(big, x @ weight.T + layer.gemm.bias, rtol=1e-5, atol=1e-5)


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
    assert torch.equal(gpt2.wte.weight, gpt2.wte.weight.to(torch.bfloat16).float())  # embeddings rounded too


def test_gpt2_prompt_logits_and_greedy_decoding_match_the_rounded_oracle(gpt2, gpt2_oracle):
    rng = random.Random(0)
    prompts = [[rng.randrange(50257) for _ in range(n)] for n in (3, 40)]
    with torch.no_grad():
        expected = gpt2_oracle(torch.tensor([prompts[1]])).logits[0]
    [ours] = prompt_logits(gpt2, [prompts[1]])  # 40 rows: oneDNN
    assert (ours - expected).abs().max().item() <= ATOL
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
    for n in (len(ids), 5):  # oneDNN, then every projection through the kernel
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
