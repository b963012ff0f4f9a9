"""GPT-OSS against transformers' GptOssForCausalLM (fp32, eager attention) built from the same tiny checkpoint.

The model runs on the ``device`` fixture's device (``--device cuda`` puts it on the GPU); the oracle stays on the
CPU, and logits are compared there."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import GptOssConfig as HFGptOssConfig, GptOssForCausalLM
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from models.checkpoint import CheckpointError
from models.forward_batch import ForwardBatch
from models.gpt_oss import GptOss, load_gpt_oss
from models.kv_cache import PagedKVCache
from models.moe import Experts
from models.rotary import YarnRotary
from models.testing.gpt_oss_checkpoint import write_tiny_gpt_oss
from tests.gpt_oss_oracle import transformers_gpt_oss
from tests.linear_paths import PATHS, on_path, on_same_path

SLIDING_WINDOW = 8
BLOCK_SIZE = 4
VOCAB = 201088


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory) -> Path:
    return write_tiny_gpt_oss(tmp_path_factory.mktemp("gpt-oss"), layout="hf+original", sliding_window=SLIDING_WINDOW)


@pytest.fixture(scope="module", params=PATHS)
def model(request: pytest.FixtureRequest, checkpoint_dir, device: torch.device) -> GptOss:
    """Every oracle test runs on each linear path (tests/linear_paths.py)."""
    return on_path(load_gpt_oss(checkpoint_dir, torch.float32, device), request.param, device)


@pytest.fixture(scope="module")
def oracle(checkpoint_dir) -> GptOssForCausalLM:
    return transformers_gpt_oss(checkpoint_dir)


def random_tokens(n: int, seed: int) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def device_of(model: GptOss) -> torch.device:
    return model.norm.weight.device  # a parameter in every form of the model (linears may hold packed buffers)


@torch.inference_mode()
def full_forward(model: GptOss, ids: list[int]) -> torch.Tensor:
    """The prompt's logits in one prefill, on the CPU."""
    blocks = -(-len(ids) // BLOCK_SIZE)
    cache = PagedKVCache(model.kv_cache_spec(), blocks, BLOCK_SIZE, device=device_of(model))
    batch = ForwardBatch.build([ids], [0], [list(range(blocks))], BLOCK_SIZE, device_of(model))
    return model.compute_logits(model(batch, cache)).cpu()


@torch.inference_mode()
def oracle_logits(oracle: GptOssForCausalLM, ids: list[int]) -> torch.Tensor:
    return oracle(torch.tensor([ids])).logits[0]


def test_logits_match_transformers_beyond_the_sliding_window(model, oracle):
    ids = random_tokens(5 * SLIDING_WINDOW, seed=1)
    ours, theirs = full_forward(model, ids), oracle_logits(oracle, ids)
    assert theirs.std() > 1.0  # far from flat
    assert (ours - theirs).abs().max().item() <= 1e-4


@torch.inference_mode()
def test_paged_prefill_and_decode_in_mixed_batches_match_full_forward(model, oracle):
    decode_steps = 30
    # Step 0: seq 0 prefills. Step 1: seq 0 decodes while seq 1 prefills a first chunk. Step 2: seq 1
    # finishes its prompt beside seq 0's decode token and seq 2's whole prompt. Then everyone decodes.
    schedule = [[(0, 21)], [(1, 10), (0, 1)], [(0, 1), (1, 7), (2, 3)]] + [[(0, 1), (1, 1), (2, 1)]] * decode_steps
    lengths = [sum(n for step in schedule for i, n in step if i == seq) for seq in range(3)]
    sequences = [random_tokens(n, seed=20 + seq) for seq, n in enumerate(lengths)]
    expected = [oracle_logits(oracle, s) for s in sequences]

    pool = torch.randperm(64, generator=torch.Generator().manual_seed(3)).tolist()
    tables = [pool[0:14], pool[14:28], pool[28:42]]  # shuffled, non-contiguous, interleaved between sequences
    cache = PagedKVCache(model.kv_cache_spec(), 64, BLOCK_SIZE, device=device_of(model))
    done = [0, 0, 0]
    for step in schedule:
        batch = ForwardBatch.build(
            [sequences[i][done[i] : done[i] + n] for i, n in step],
            [done[i] for i, _ in step],
            [tables[i] for i, _ in step],
            BLOCK_SIZE,
            device_of(model),
        )
        logits = model.compute_logits(model(batch, cache)).cpu()
        row = 0
        for i, n in step:
            assert (logits[row : row + n] - expected[i][done[i] : done[i] + n]).abs().max().item() <= 1e-4
            row += n
            done[i] += n
    assert done == [len(s) for s in sequences]
    assert min(done) > SLIDING_WINDOW and min(done) > BLOCK_SIZE


@torch.inference_mode()
def test_greedy_generation_matches_transformers_generate(model, oracle):
    prompt = random_tokens(12, seed=5)
    theirs = oracle.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False)[0, len(prompt) :].tolist()
    cache = PagedKVCache(model.kv_cache_spec(), 16, BLOCK_SIZE, device=device_of(model))
    table = list(range(15, -1, -1))
    ours, chunk, start = [], prompt, 0
    while len(ours) < 40:
        batch = ForwardBatch.build([chunk], [start], [table], BLOCK_SIZE, device_of(model))
        hidden = model(batch, cache)[batch.last_token_index]
        start += len(chunk)
        chunk = [int(model.compute_logits(hidden).argmax(-1))]
        ours += chunk
    assert len(theirs) == 40 and len(set(ours)) > 5
    assert ours == theirs


def test_hf_and_original_layouts_give_identical_logits(model, checkpoint_dir):
    original = on_same_path(load_gpt_oss(checkpoint_dir / "original", torch.float32, device_of(model)), model)
    assert original.config == model.config
    ids = random_tokens(20, seed=7)
    assert torch.equal(full_forward(original, ids), full_forward(model, ids))


def test_packed_experts_give_the_float_experts_logits(model, checkpoint_dir):
    loaded = load_gpt_oss(checkpoint_dir, torch.float32, device_of(model), keep_experts_packed=True)
    packed = on_same_path(loaded, model)
    experts = packed.layers[0].moe.experts
    assert experts.packed and experts.gate_up_blocks.dtype == torch.uint8
    ids = random_tokens(20, seed=8)
    # the same weights to the bit; an expert's few tokens go through the MXFP4 kernel, whose sums run in
    # another order than the float experts' matmul
    torch.testing.assert_close(full_forward(packed, ids), full_forward(model, ids), rtol=0, atol=1e-4)


def test_float_experts_checkpoint_gives_identical_logits(model, tmp_path):
    float_dir = write_tiny_gpt_oss(tmp_path / "float", float_experts=True, sliding_window=SLIDING_WINDOW)
    index = json.loads((float_dir / "model.safetensors.index.json").read_text())
    assert not any(name.endswith("_blocks") for name in index["weight_map"])
    loaded = load_gpt_oss(float_dir, torch.float32, device_of(model), keep_experts_packed=True)
    unpacked = on_same_path(loaded, model)
    assert not unpacked.layers[0].moe.experts.packed  # nothing to keep packed
    ids = random_tokens(20, seed=12)
    assert torch.equal(full_forward(unpacked, ids), full_forward(model, ids))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_load_computes_in_that_dtype_close_to_float32(model, checkpoint_dir, dtype):
    low = load_gpt_oss(checkpoint_dir / "original", dtype, device_of(model), keep_experts_packed=True)
    assert low.lm_head.weight.dtype == dtype and low.norm.weight.dtype == torch.float32
    ids = random_tokens(12, seed=9)
    reference, approx = full_forward(model, ids), full_forward(low, ids)
    assert approx.dtype == torch.float32 and torch.isfinite(approx).all()
    # 16-bit rounding through three layers (transformers' own bf16 model strays as far): about 3% of the
    # logits' spread in bf16, 0.2% in fp16.
    assert (approx - reference).abs().mean() < 0.05 * reference.std()


def test_moe_runs_only_the_experts_the_router_selects(model, monkeypatch):
    runs: list[tuple[int, list[int]]] = []  # (layer, tokens per expert)
    selected: list[set[tuple[int, int]]] = []
    layer_of = {id(layer.moe.experts): i for i, layer in enumerate(model.layers)}
    real_run = Experts.run

    def counting_run(self, x, counts):
        runs.append((layer_of[id(self)], list(counts)))
        return real_run(self, x, counts)

    monkeypatch.setattr(Experts, "run", counting_run)
    k = model.config.experts_per_token

    def record_selection(layer: int):
        def hook(module, args, logits):
            selected.append({(layer, e) for e in logits.topk(k).indices.flatten().tolist()})

        return hook

    hooks = [layer.moe.router.register_forward_hook(record_selection(i)) for i, layer in enumerate(model.layers)]
    ids = random_tokens(6, seed=11)
    try:
        full_forward(model, ids)
    finally:
        for hook in hooks:
            hook.remove()
    assert [layer for layer, _ in runs] == list(range(len(model.layers)))  # one grouped run per layer
    ran = {(layer, expert) for layer, counts in runs for expert, n in enumerate(counts) if n}
    assert ran == set().union(*selected)
    for _, counts in runs:
        assert sum(counts) == len(ids) * k  # every (token, pick) once, with its expert's other tokens
    assert len(ran) < len(model.layers) * model.config.num_experts  # some experts were never touched

    runs.clear()
    full_forward(model, ids[:1])
    assert [sum(n > 0 for n in counts) for _, counts in runs] == [k] * len(model.layers)


def test_yarn_frequencies_match_transformers_at_gpt_oss_20b_settings():
    rope = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False}
    rope |= {"original_max_position_embeddings": 4096, "rope_theta": 150000.0}
    hf_config = HFGptOssConfig(head_dim=64, rope_parameters=rope)
    inv_freq, concentration = ROPE_INIT_FUNCTIONS["yarn"](hf_config, "cpu")
    ours = YarnRotary(64, 150000.0, factor=32.0, original_context=4096, beta_fast=32.0, beta_slow=1.0)
    assert torch.equal(ours.inv_freq, inv_freq)
    assert ours.concentration == pytest.approx(concentration, abs=0)


def edited_copy(source: Path, target: Path, **config_changes) -> Path:
    """``source``'s weights (linked) with its config.json changed."""
    target.mkdir()
    for path in source.iterdir():
        if path.suffix == ".safetensors" or path.name.endswith(".index.json"):
            (target / path.name).symlink_to(path)
    config = json.loads((source / "config.json").read_text()) | config_changes
    (target / "config.json").write_text(json.dumps(config))
    return target


@pytest.mark.parametrize(
    "folder, key, value",
    [
        ("", "num_experts_per_tok", 9),
        ("", "head_dim", 0),
        ("original", "experts_per_token", 0),
        ("original", "hidden_size", -1),
    ],
)
def test_out_of_range_config_key_is_named(checkpoint_dir, tmp_path, folder, key, value):
    broken = edited_copy(checkpoint_dir / folder, tmp_path / "broken", **{key: value})
    with pytest.raises(CheckpointError, match=f"{key}={value} is out of range"):
        load_gpt_oss(broken, torch.float32, torch.device("cpu"))


@pytest.mark.parametrize(
    "folder, change, tensor",
    [
        ("", {"num_key_value_heads": 1}, "model.layers.0.self_attn.k_proj.weight"),
        ("original", {"intermediate_size": 32}, "block.0.mlp.mlp1_weight.blocks"),
    ],
)
def test_wrong_tensor_shape_names_the_tensor(checkpoint_dir, tmp_path, folder, change, tensor):
    broken = edited_copy(checkpoint_dir / folder, tmp_path / "broken", **change)
    with pytest.raises(CheckpointError, match=f"tensor {tensor} has shape"):
        load_gpt_oss(broken, torch.float32, torch.device("cpu"))


def test_missing_original_checkpoint_tensor_is_named(checkpoint_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(checkpoint_dir / "original", broken)
    tensors = load_file(broken / "model.safetensors")
    del tensors["block.1.attn.sinks"]
    save_file(tensors, broken / "model.safetensors")
    with pytest.raises(CheckpointError, match="block.1.attn.sinks is missing"):
        load_gpt_oss(broken, torch.float32, torch.device("cpu"))
