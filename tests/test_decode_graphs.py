"""Decode steps run from the padded static batches of server/engine/decode_graphs.py equal the plain path.

On CPU the static forward runs eagerly (the forward a graph would record), which checks the padding,
bucketing and scratch block; with ``--device cuda`` the engine captures and replays real CUDA graphs and
the same checks compare them with eager CUDA steps.
"""

from __future__ import annotations

import random

import pytest
import torch

from models import attention
from models.loader import load_model
from models.testing.gpt_oss_checkpoint import write_tiny_gpt_oss
from server.engine.decode_graphs import DecodeGraphs, buckets
from server.engine.engine import EngineConfig, LLMEngine
from server.engine.sampling_params import SamplingParams


@pytest.fixture(scope="module", params=["float32", "bfloat16", "gpt-oss-float32"])
def loaded(request, tiny_gpt2_dir, device, tmp_path_factory):
    """bfloat16 on CPU is held to the gather + SDPA decode path that CUDA takes; float32 on CPU the C++ kernels
    (which would serve bfloat16 too). GPT-OSS (sinks, a sliding window, experts) with its MoE routed on the
    device, as graphs need."""
    if request.param.startswith("gpt-oss"):
        checkpoint = write_tiny_gpt_oss(tmp_path_factory.mktemp("gpt-oss"), sliding_window=8)
        loaded = load_model(checkpoint, dtype="float32", device=str(device))
        loaded.model.use_static_routing()
        yield loaded
        return
    with pytest.MonkeyPatch.context() as patch:
        if request.param == "bfloat16":
            patch.setattr(attention, "decode_kernels_apply", lambda _q: False)
        yield load_model(tiny_gpt2_dir, dtype=request.param, device=str(device))


def test_buckets_double_up_to_the_limit():
    assert buckets(1) == [1]
    assert buckets(2) == [1, 2]
    assert buckets(12) == [1, 2, 4, 8, 12]
    assert buckets(64) == [1, 2, 4, 8, 16, 32, 64]


def graphed_engine(loaded, config: EngineConfig) -> LLMEngine:
    engine = LLMEngine(loaded, config)
    if loaded.device.type == "cuda":
        assert engine.runner.decode_graphs is not None, "CUDA engines capture decode graphs by default"
    else:  # nothing to capture on CPU: the same static batches run eagerly
        assert engine.runner.decode_graphs is None
        max_blocks = -(-engine.max_model_len // config.block_size)
        engine.runner.decode_graphs = DecodeGraphs(
            loaded.model, engine.cache, config.max_num_seqs, max_blocks, engine.block_manager.num_blocks
        )
    return engine


class StepRecorder:
    """Wraps an engine's runner to keep each step's logits and shape."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.logits: list[torch.Tensor] = []
        self.steps: list[tuple[int, int, bool]] = []  # (chunks, sampling rows, replayed from a graph)
        self._run = engine.runner.run
        engine.runner.run = self._record

    def _record(self, chunks, interrupt=None):
        graphs = self.engine.runner.decode_graphs
        before = graphs.steps if graphs else 0
        step = self._run(chunks, interrupt)
        self.logits.append(step.logits.detach().clone())
        self.steps.append((len(chunks), len(step.sampling_seqs), bool(graphs) and graphs.steps > before))
        return step


def drain(engine: LLMEngine) -> dict[str, list[int]]:
    tokens: dict[str, list[int]] = {}
    for _ in range(10_000):
        if not engine.has_work:
            return tokens
        for request_id, out in engine.step():
            tokens.setdefault(request_id, []).extend(out.new_token_ids)
    raise AssertionError("engine did not drain")


def test_graph_steps_match_eager_steps_logits_tokens_and_cache(loaded):
    # 14 requests, 16 rows, 13 tokens a step: the last prompt is long and, once admitted, gets what the others'
    # decodes leave of the budget (they finish one a step: 1, 2, ... tokens; the 1-token piece does not sample
    # yet); batches of every size pad to the next bucket, and contexts cross several 8-token blocks
    config = dict(max_num_seqs=16, max_num_batched_tokens=13, kv_cache_tokens=4096, block_size=8)
    eager = LLMEngine(loaded, EngineConfig(**config, enforce_eager=True))
    assert eager.runner.decode_graphs is None
    graphed = graphed_engine(loaded, EngineConfig(**config))
    rng = random.Random(0)
    requests = []
    for i in range(14):
        length = 1 + (i * 5) % 23 + (30 if i == 13 else 0)  # the first prompt is one token
        prompt = [rng.randrange(50257) for _ in range(length)]
        # the bias forces each request's tokens, so both engines feed the same inputs whatever rounding
        # differs between padded and unpadded batches (in bfloat16 a near-tie could otherwise flip)
        params = SamplingParams(max_tokens=25 + i, temperature=0.0, ignore_eos=True,
                                logit_bias={rng.randrange(50257): 100.0}, prompt_logprobs=1 if i == 3 else None)
        requests.append((f"r{i}", prompt, params))
    recorders = []
    for engine in (eager, graphed):
        recorders.append(StepRecorder(engine))
        for request_id, prompt, params in requests:
            engine.add_request(request_id, prompt, params)
    tokens = [drain(eager), drain(graphed)]

    assert tokens[0] == tokens[1]
    eager_steps, graph_steps = recorders[0].steps, recorders[1].steps
    assert [s[:2] for s in eager_steps] == [s[:2] for s in graph_steps]  # the same schedule, step for step
    tol = 1e-4 if loaded.dtype == torch.float32 else 2e-2
    for expected, got in zip(recorders[0].logits, recorders[1].logits):
        torch.testing.assert_close(got, expected, rtol=tol, atol=tol)
    replayed = [s for s in graph_steps if s[2]]
    assert len(replayed) > 20
    assert any(rows < chunks for chunks, rows, _ in replayed), "a one-token prefill piece went through a graph"
    assert {chunks for chunks, _, _ in replayed} & {3, 5, 6, 7, 9, 10, 11}, "some batches were padded"
    # padding rows wrote only the scratch block: every block the engine hands out holds the same K/V
    handed_out = graphed.block_manager.num_blocks * config["block_size"]
    for expected, got in zip(eager.cache.keys + eager.cache.values, graphed.cache.keys + graphed.cache.values):
        torch.testing.assert_close(got[:handed_out], expected[:handed_out], rtol=tol, atol=tol)


def test_a_one_token_embedding_request_among_decodes_is_not_replayed_from_a_graph(loaded):
    """A graph returns logits only: a one-token prompt asking for its hidden state, in a step of one-token
    decodes, takes the eager path and gets the same state as in an eager engine."""
    config = dict(max_num_seqs=4, max_num_batched_tokens=16, kv_cache_tokens=1024, block_size=8)
    states = []
    for engine in (LLMEngine(loaded, EngineConfig(**config, enforce_eager=True)),
                   graphed_engine(loaded, EngineConfig(**config))):
        engine.add_request("decoding", [11, 22, 33], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
        engine.step()  # its prompt in: from now on it decodes one token a step
        engine.add_request("embed", [44], SamplingParams(max_tokens=0, temperature=0.0, embed=True))
        outputs = [out for _, out in engine.step()]
        [embedded] = [out for out in outputs if out.embedding is not None]
        states.append(torch.tensor(embedded.embedding))
        assert embedded.new_token_ids == [] and embedded.finish_reason == "length"
        drain(engine)
    tol = 1e-4 if loaded.dtype == torch.float32 else 2e-2
    torch.testing.assert_close(states[1], states[0], rtol=tol, atol=tol)


def test_the_scratch_block_is_never_handed_out(loaded):
    engine = LLMEngine(loaded, EngineConfig(kv_cache_tokens=64, block_size=8))
    assert engine.block_manager.num_blocks == 8
    assert engine.cache.keys[0].shape[0] == 9 * 8
    assert engine.capacity_tokens == 64


def test_enforce_eager_flag_reaches_the_engine_config():
    from server.cli import parse_config

    assert parse_config([]).engine.enforce_eager is False
    assert parse_config(["--enforce-eager"]).engine.enforce_eager is True
