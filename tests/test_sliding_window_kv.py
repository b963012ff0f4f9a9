"""GPT-OSS's sliding-window layers keep only their window's KV blocks (server/engine/block_manager.py), and
the served tokens stay exactly transformers'."""

import pytest
import torch

import models.attention as attention
from models.loader import load_model
from models.testing.gpt_oss_checkpoint import write_tiny_gpt_oss
from server.engine.block_manager import FREED, BlockManager
from server.engine.engine import EngineConfig, LLMEngine
from server.engine.sampling_params import SamplingParams
from server.engine.sequence import Sequence
from tests.gpt_oss_oracle import transformers_gpt_oss

WINDOW = 8
BLOCK = 4
CHUNK = 6  # prefill chunks that start mid-block, so a chunk's first query sees blocks of the chunk before
DECODE_BOUND = -(-WINDOW // BLOCK) + 1
CHUNK_BOUND = -(-(WINDOW - 1 + CHUNK) // BLOCK) + 1
VOCAB = 201088


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_tiny_gpt_oss(tmp_path_factory.mktemp("gpt-oss"), sliding_window=WINDOW)


@pytest.fixture(scope="module")
def loaded(checkpoint):
    return load_model(checkpoint, dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def oracle(checkpoint):
    return transformers_gpt_oss(checkpoint)


def engine_for(loaded, **overrides) -> LLMEngine:
    config = {"kv_cache_tokens": 512, "block_size": BLOCK, "max_num_batched_tokens": CHUNK} | overrides
    return LLMEngine(loaded, EngineConfig(**config))


def random_tokens(n: int, seed: int) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def greedy_of_transformers(oracle, prompt: list[int], max_tokens: int) -> list[int]:
    out = oracle.generate(torch.tensor([prompt]), max_new_tokens=max_tokens, do_sample=False)
    return out[0, len(prompt) :].tolist()


def live_sliding_blocks(seq: Sequence) -> int:
    return sum(1 for block in seq.block_tables[1] if block != FREED)


def serve(
    engine: LLMEngine, prompts: dict[str, list[int]], max_tokens: int
) -> tuple[dict[str, list[int]], dict[str, int]]:
    """Greedy outputs and cached prompt tokens, checking after every step how many sliding blocks each running
    sequence holds."""
    for request_id, prompt in prompts.items():
        engine.add_request(request_id, prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0))
    tokens: dict[str, list[int]] = {request_id: [] for request_id in prompts}
    cached: dict[str, int] = {}
    while engine.has_work:
        before = {id(seq): seq.num_computed_tokens for seq in engine.scheduler.running}
        for request_id, out in engine.step():
            tokens[request_id] += out.new_token_ids
            if out.num_prompt_tokens:  # only the first output reports the prompt
                cached[request_id] = out.num_cached_tokens
        for seq in engine.scheduler.running:
            decoded = seq.num_computed_tokens - before.get(id(seq), -1) == 1
            bound = DECODE_BOUND if decoded else CHUNK_BOUND
            assert live_sliding_blocks(seq) <= bound, (seq.num_computed_tokens, seq.block_tables[1])
    return tokens, cached


def test_grouped_pool_holds_half_the_layers_per_block(loaded):
    engine = engine_for(loaded)
    spec = engine.cache.spec
    assert spec.windows == (WINDOW, None, WINDOW)  # the tiny model's three layers
    assert engine.cache.num_groups == 2 and len(engine.cache.keys) == 2  # a full layer shares with a sliding one
    assert spec.bytes_per_token(torch.float32, grouped=True) * 3 == spec.bytes_per_token(torch.float32) * 2


def test_long_sequence_keeps_only_the_window_and_matches_transformers(loaded, oracle):
    engine = engine_for(loaded)
    prompt = random_tokens(27, seed=1)
    ours, _ = serve(engine, {"long": prompt}, max_tokens=45)  # 72 tokens: nine windows
    assert ours["long"] == greedy_of_transformers(oracle, prompt, 45)
    assert engine.block_manager.num_used_blocks == 0 and engine.stats().kv_blocks_used == 0


def test_a_sliding_layers_prefill_chunk_gathers_only_the_blocks_its_window_sees(loaded, oracle, monkeypatch):
    gathered: list[tuple[int, int]] = []  # (first key position, blocks) of every gather
    real = attention._gather_blocks
    monkeypatch.setattr(attention, "_gather_blocks", lambda cache, group: gathered.append(
        (group.key_start, group.key_blocks.shape[1])) or real(cache, group))
    engine = engine_for(loaded)
    prompt = random_tokens(27, seed=5)  # chunks of 6: the later ones start past the window
    ours, _ = serve(engine, {"long": prompt}, max_tokens=3)
    assert ours["long"] == greedy_of_transformers(oracle, prompt, 3)
    trimmed = [blocks for start, blocks in gathered if start > 0]
    assert trimmed and max(trimmed) <= CHUNK_BOUND
    assert max(blocks for _, blocks in gathered) == -(-27 // BLOCK)  # the full layer still reads it all


def test_prefix_hit_on_a_long_shared_prefix_is_exact(loaded, oracle):
    engine = engine_for(loaded)
    shared = random_tokens(37, seed=2)
    first, second = shared + random_tokens(3, seed=3), shared + random_tokens(5, seed=4)
    serve(engine, {"first": first}, max_tokens=4)
    ours, cached = serve(engine, {"second": second}, max_tokens=12)
    assert cached["second"] == 36  # every full block of the shared prefix, its window's sliding blocks too
    assert ours["second"] == greedy_of_transformers(oracle, second, 12)


def test_sequences_preempted_for_blocks_resume_exactly(loaded, oracle):
    engine = engine_for(loaded, kv_cache_tokens=28 * BLOCK)  # one sequence of 60 tokens needs 15 + 5 blocks
    prompts = {"a": random_tokens(20, seed=5), "b": random_tokens(21, seed=6)}
    ours, _ = serve(engine, prompts, max_tokens=40)
    assert engine.scheduler.num_preemptions > 0
    assert ours == {name: greedy_of_transformers(oracle, prompt, 40) for name, prompt in prompts.items()}
    assert engine.block_manager.num_used_blocks == 0


def sequence(tokens: list[int]) -> Sequence:
    return Sequence("r", 0, tokens, len(tokens), SamplingParams(max_tokens=1), 0.0)


def test_a_prefix_hit_is_cut_to_what_the_sliding_group_still_holds():
    manager = BlockManager(64, BLOCK, windows=(None, WINDOW))
    prompt = list(range(41))
    first = sequence(prompt)
    assert manager.admit(first, token_budget=41) == 41
    full_blocks = list(first.block_table)
    manager.free(first)
    assert manager.find_cached_prefix(sequence(prompt)) == full_blocks[:10]
    # the sliding blocks are released first, so they are handed out first: the last four go
    hog = sequence(list(range(1000, 1092)))
    assert manager.admit(hog, token_budget=92) == 92
    # a hit of k blocks needs the sliding blocks the window before position 4k covers: k = 7 keeps 5 and 6
    assert manager.find_cached_prefix(sequence(prompt)) == full_blocks[:7]


def test_a_decoding_sequence_holds_only_its_window_and_returns_every_block():
    manager = BlockManager(64, BLOCK, windows=(None, WINDOW))
    seq = sequence(list(range(10)))
    assert manager.admit(seq, token_budget=CHUNK) == CHUNK
    seq.num_computed_tokens = CHUNK
    while seq.num_computed_tokens < 100:
        n = min(CHUNK, seq.num_tokens - seq.num_computed_tokens) if seq.num_computed_tokens < 10 else 1
        seq.token_ids += [7] * max(0, seq.num_computed_tokens + n - seq.num_tokens)
        assert manager.can_allocate(seq, n)
        manager.allocate(seq, n)
        assert live_sliding_blocks(seq) <= (DECODE_BOUND if n == 1 else CHUNK_BOUND)
        assert len(seq.block_table) == -(-(seq.num_computed_tokens + n) // BLOCK)  # full attention keeps all
        seq.num_computed_tokens += n
    assert manager.num_used_blocks == len(seq.block_table) + live_sliding_blocks(seq)
    manager.free(seq)
    assert manager.num_used_blocks == 0
