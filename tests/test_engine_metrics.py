"""The engine feeds /metrics: gauges follow admissions and every way a request ends, counters match the outputs.

The engine is driven step by step with a real `Metrics` sink, and the series are read back from the exposition
as Prometheus would read them.
"""

from __future__ import annotations

import pytest

from models.loader import load_model
from server.engine.engine import EngineConfig, LLMEngine
from server.engine.sampling_params import SamplingParams
from server.engine.step_metrics import StepMetrics
from server.metrics import Metrics
from tests.test_metrics import value

PROMPT = list(range(1000, 1040))  # 40 tokens: 5 full blocks of 8


@pytest.fixture(scope="module")
def loaded(tiny_gpt2_dir, device):
    return load_model(tiny_gpt2_dir, dtype="float32", device=str(device))


def make_engine(loaded, **overrides) -> tuple[LLMEngine, Metrics]:
    metrics = Metrics()
    config = EngineConfig(**({"kv_cache_tokens": 4096, "max_num_batched_tokens": 64, "block_size": 8} | overrides))
    return LLMEngine(loaded, config, StepMetrics(metrics.for_model("tiny"))), metrics


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def gauges(metrics: Metrics) -> tuple[float, float, float, float]:
    return (value(metrics, "gptserve:num_requests_running"), value(metrics, "gptserve:num_requests_waiting"),
            value(metrics, "gptserve:kv_cache_blocks_used"), value(metrics, "gptserve:kv_cache_usage_perc"))


def drain(engine: LLMEngine) -> int:
    """Steps until idle; the number of generated tokens the outputs carried."""
    tokens = 0
    for _ in range(1000):
        if not engine.has_work:
            return tokens
        tokens += sum(len(out.new_token_ids) for _, out in engine.step())
    raise AssertionError("engine did not drain")


def test_gauges_count_admitted_and_waiting_requests_and_return_to_zero_after_finishing(loaded):
    engine, metrics = make_engine(loaded, max_num_seqs=1)
    engine.add_request("a", PROMPT, greedy(4))
    engine.add_request("b", PROMPT[:20], greedy(4))
    engine.step()
    running, waiting, blocks, usage = gauges(metrics)
    assert (running, waiting) == (1, 1) and blocks == 5 and usage == pytest.approx(5 / 512)
    drain(engine)
    assert gauges(metrics) == (0, 0, 0, 0)
    assert value(metrics, "gptserve:request_success_total", finished_reason="length") == 2


def test_abort_between_steps_zeroes_the_gauges_and_counts_an_abort(loaded):
    engine, metrics = make_engine(loaded)
    engine.add_request("x", PROMPT, greedy(50))
    engine.step()
    engine.step()
    assert gauges(metrics)[0] == 1 and gauges(metrics)[2] > 0
    engine.abort("x")  # no step follows: the engine is idle now
    assert not engine.has_work
    assert gauges(metrics) == (0, 0, 0, 0)
    assert value(metrics, "gptserve:request_success_total", finished_reason="abort") == 1


def test_abort_of_a_waiting_request_empties_the_queue_gauge(loaded):
    engine, metrics = make_engine(loaded, max_num_seqs=1)
    engine.add_request("running", PROMPT, greedy(50))
    engine.add_request("queued", PROMPT, greedy(50))
    engine.step()
    assert gauges(metrics)[:2] == (1, 1)
    engine.abort("queued")
    assert gauges(metrics)[:2] == (1, 0)
    engine.abort("running")
    assert gauges(metrics) == (0, 0, 0, 0)


def test_stop_string_match_between_steps_zeroes_the_gauges(loaded):
    engine, metrics = make_engine(loaded)
    engine.add_request("s", PROMPT, greedy(50))
    engine.step()
    engine.stop_choice("s", 0)
    assert gauges(metrics) == (0, 0, 0, 0)
    assert value(metrics, "gptserve:request_success_total", finished_reason="stop") == 1


def test_cached_blocks_nobody_holds_read_as_free(loaded):
    engine, metrics = make_engine(loaded)
    engine.add_request("first", PROMPT, greedy(2))
    drain(engine)
    engine.add_request("again", PROMPT, greedy(2))
    drain(engine)
    assert engine.block_manager.cached, "the prompt's blocks stay in the prefix cache"
    assert gauges(metrics) == (0, 0, 0, 0)
    assert value(metrics, "gptserve:prefix_cache_queries_total") == 2 * len(PROMPT)
    assert value(metrics, "gptserve:prefix_cache_hits_total") == 32  # 4 full blocks; the last token is computed


def test_prompt_tokens_count_when_the_prefill_is_done_not_when_the_request_ends(loaded):
    """As vLLM counts them: a long answer's prompt shows in the prompt throughput while it is written."""
    engine, metrics = make_engine(loaded, max_num_batched_tokens=16)  # the 40-token prompt takes three steps
    engine.add_request("long", PROMPT, greedy(20))
    for _ in range(2):
        engine.step()
        assert value(metrics, "gptserve:prompt_tokens_total") == 0  # a chunk of it is in, not all
    engine.step()
    assert engine.has_work and value(metrics, "gptserve:prompt_tokens_total") == len(PROMPT)
    drain(engine)
    assert value(metrics, "gptserve:prompt_tokens_total") == len(PROMPT)  # once, not again at the end


def test_token_counters_and_histograms_match_the_outputs(loaded):
    engine, metrics = make_engine(loaded)
    for i, max_tokens in enumerate((3, 7, 1)):  # prompts share no block, so nothing comes from the cache
        engine.add_request(f"r{i}", [2000 + 100 * i + t for t in range(10 + i)], greedy(max_tokens))
    assert drain(engine) == 11
    assert value(metrics, "gptserve:generation_tokens_total") == 11
    assert value(metrics, "gptserve:prompt_tokens_total") == 10 + 11 + 12
    assert value(metrics, "gptserve:time_to_first_token_seconds_count") == 3
    assert value(metrics, "gptserve:inter_token_latency_seconds_count") == 11 - 3
    assert value(metrics, "gptserve:request_time_per_output_token_seconds_count") == 2  # one-token request has none
    assert value(metrics, "gptserve:e2e_request_latency_seconds_count") == 3
    assert value(metrics, "gptserve:request_generation_tokens_sum") == 11
    assert value(metrics, "gptserve:iteration_tokens_total_sum") == 33 + 11 - 3  # prompts, then one per decode


def test_preemption_is_counted_and_gauges_settle(loaded):
    engine, metrics = make_engine(loaded, kv_cache_tokens=64, max_num_batched_tokens=128)  # 8 blocks of 8
    engine.add_request("a", PROMPT[:20], greedy(30))
    engine.add_request("b", PROMPT[20:], greedy(30))
    drain(engine)
    assert value(metrics, "gptserve:num_preemptions_total") >= 1
    assert value(metrics, "gptserve:request_success_total", finished_reason="length") == 2
    assert gauges(metrics) == (0, 0, 0, 0)
