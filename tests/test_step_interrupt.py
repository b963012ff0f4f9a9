"""A step of decodes given up between layers for a newcomer: nothing it touched may change what anyone gets.

The engine asks its ``interrupt`` before each layer and before the logits of a decode-only step (engine.py);
giving the step up must leave every sequence, the sampler's generators and the prefix cache as if the step had
never started, and the step run again must produce the tokens an engine that was never interrupted produces.
"""

from __future__ import annotations

import threading

import pytest
import torch

from models.forward_batch import ForwardBatch, ForwardInterrupted
from models.gpt_oss import load_gpt_oss
from models.kv_cache import PagedKVCache
from models.loader import load_model
from models.testing.gpt_oss_checkpoint import write_tiny_gpt_oss
from server.engine import core_messages as wire
from server.engine.engine import EngineConfig, LLMEngine
from server.engine.metric_events import MetricRecorder, replay
from server.engine.sampling_params import SamplingParams
from server.engine.step_metrics import StepMetrics
from server.metrics import Metrics
from tests.inproc_core import InprocCore
from tests.test_engine import make_engine, random_prompt, run_all, tokens_of
from tests.test_metrics import value


@pytest.fixture(scope="module")
def loaded(tiny_gpt2_dir, device):
    return load_model(tiny_gpt2_dir, dtype="float32", device=str(device))


class FireOnAsk:
    """An interrupt that says yes on its ``nth`` question of a step (0: before the first layer), and counts."""

    def __init__(self, nth: int) -> None:
        self.nth = nth
        self.asked = 0

    def __call__(self) -> bool:
        self.asked += 1
        return self.asked == self.nth + 1


def params(seed: int | None) -> SamplingParams:
    if seed is None:
        return SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    return SamplingParams(max_tokens=12, temperature=1.0, seed=seed, ignore_eos=True)


def add_three(engine: LLMEngine) -> None:
    for i, seed in enumerate((None, 7, 11)):
        engine.add_request(f"r{i}", random_prompt(5 + 6 * i, seed=i), params(seed))


def test_decode_steps_given_up_at_every_layer_rerun_to_the_tokens_of_an_uninterrupted_engine(loaded):
    reference = make_engine(loaded)
    add_three(reference)
    expected = {rid: tokens_of(outs[0]) for rid, outs in run_all(reference).items()}

    engine = make_engine(loaded)
    add_three(engine)
    results = {rid: out.new_token_ids for rid, out in engine.step()}  # the three prompts, in one step
    questions = len(loaded.model.h) + 1  # before each block and before the logits
    for step in range(100):
        if not engine.has_work:
            break
        nth = step % (questions + 1)  # fires at each place in turn, then a step that runs through
        before = [(s.num_computed_tokens, len(s.token_ids), s.num_published_blocks) for s in engine.scheduler.running]
        interrupt = FireOnAsk(nth)
        outputs = engine.step(interrupt)
        if nth < questions:
            assert outputs == [] and interrupt.asked == nth + 1
            assert before == [(s.num_computed_tokens, len(s.token_ids), s.num_published_blocks)
                              for s in engine.scheduler.running]
        else:
            assert interrupt.asked == questions
        for rid, out in outputs:
            results.setdefault(rid, []).extend(out.new_token_ids)
    assert not engine.has_work
    assert results == expected


def test_prompt_steps_given_up_before_their_second_layer_rerun_to_the_tokens_of_an_uninterrupted_engine(loaded):
    reference = make_engine(loaded)
    add_three(reference)
    expected = {rid: tokens_of(outs[0]) for rid, outs in run_all(reference).items()}

    engine = make_engine(loaded)
    engine.add_request("r0", random_prompt(5, seed=0), params(None))
    assert engine.step(FireOnAsk(1)) == []  # r0's prompt given up after one layer, for the two below
    for i, seed in ((1, 7), (2, 11)):
        engine.add_request(f"r{i}", random_prompt(5 + 6 * i, seed=i), params(seed))
    assert engine.step(FireOnAsk(0)) == []  # and the three prompts' step before its first
    results: dict[str, list[int]] = {}
    while engine.has_work:
        for rid, out in engine.step():
            results.setdefault(rid, []).extend(out.new_token_ids)
    assert results == expected


def test_a_block_the_given_up_step_would_fill_is_not_published_until_the_step_runs(loaded):
    engine = make_engine(loaded, block_size=8)
    engine.add_request("a", random_prompt(7, seed=3), params(None))
    engine.step()  # prefill 7 tokens: the next decode writes position 7, the last slot of block 0
    seq = engine.scheduler.running[0]
    assert engine.block_manager.cached == {}
    assert engine.step(FireOnAsk(1)) == []  # given up after the first layer wrote position 7's keys
    assert engine.block_manager.cached == {} and seq.num_published_blocks == 0
    assert len(engine.step(FireOnAsk(99))) == 1
    assert list(engine.block_manager.cached.values()) == [seq.block_table[0]] and seq.num_published_blocks == 1


def test_only_a_step_with_room_for_a_newcomer_is_given_up_and_one_with_a_prompt_only_early(loaded):
    always = FireOnAsk(0)
    engine = make_engine(loaded, max_num_seqs=2)
    engine.add_request("a", random_prompt(9, seed=1), params(None))
    assert engine.step(FireOnAsk(0)) == [] and engine.step(FireOnAsk(1)) == []  # a prompt, before its 2nd layer
    late = FireOnAsk(2)
    assert len(engine.step(late)) == 1 and late.asked == 2  # not after: no third question is heard
    assert engine.step(FireOnAsk(0)) == []  # decodes alone, a free slot: given up
    engine.add_request("b", random_prompt(9, seed=2), params(None))
    assert len(engine.step(always)) == 2 and always.asked == 0  # b's prefill (and a's first decode beside it)
    assert len(engine.step(always)) == 2 and always.asked == 0  # every slot taken: no newcomer could start

    spent = make_engine(loaded, max_num_batched_tokens=16)
    spent.add_request("a", random_prompt(20, seed=6), params(None))
    spent.step(always)  # a 16-token chunk: the step's token budget is spent, a newcomer could not join it
    assert always.asked == 0 and spent.scheduler.running[0].num_computed_tokens == 16

    full = make_engine(loaded, kv_cache_tokens=32, block_size=8)  # 4 blocks
    full.add_request("a", random_prompt(20, seed=4), params(None))  # 3 blocks, then a 4th when it decodes
    full.step()
    full.add_request("b", random_prompt(20, seed=5), params(None))  # cannot be admitted: it waits for blocks
    assert len(full.step(always)) == 1 and always.asked == 0 and len(full.scheduler.waiting) == 1


@pytest.mark.parametrize("family", ["gpt2", "gpt_oss"])
def test_forward_stops_before_the_layer_where_the_interrupt_fires(family, tiny_gpt2_dir, tmp_path):
    cpu = torch.device("cpu")
    if family == "gpt2":
        model = load_model(tiny_gpt2_dir, dtype="float32", device="cpu").model
        layers = model.h
    else:
        model = load_gpt_oss(write_tiny_gpt_oss(tmp_path, layout="hf"), torch.float32, cpu)
        layers = model.layers
    cache = PagedKVCache(model.kv_cache_spec(), 4, 8, dtype=torch.float32, device=cpu)
    batch = ForwardBatch.build([[3, 1, 4, 1, 5]], [0], [[0]], 8, cpu)
    ran: list[int] = []
    hooks = [layer.register_forward_pre_hook(lambda _m, _a, i=i: ran.append(i)) for i, layer in enumerate(layers)]
    try:
        with pytest.raises(ForwardInterrupted):
            model(batch, cache, FireOnAsk(1))
        assert ran == [0]
        ran.clear()
        model(batch, cache, FireOnAsk(99))
        assert ran == list(range(len(layers)))
    finally:
        for hook in hooks:
            hook.remove()


def test_a_request_posted_during_a_decode_step_interrupts_it_and_both_get_their_own_tokens(loaded):
    """Through the engine core's loop (in a thread here): held inside a decode step until the second request is
    on its command socket, which the step's interrupt finds between layers."""
    prompt_a, prompt_b = random_prompt(6, seed=20), random_prompt(9, seed=21)
    solo = make_engine(loaded)
    solo.add_request("a", prompt_a, params(None))
    solo.add_request("b", prompt_b, params(13))
    expected = {rid: tokens_of(outs[0]) for rid, outs in run_all(solo).items()}

    metrics = Metrics()
    config = EngineConfig(kv_cache_tokens=4096, max_num_batched_tokens=64, block_size=8)
    recorder = MetricRecorder()
    inproc = InprocCore(LLMEngine(loaded, config, StepMetrics(recorder)), recorder)  # type: ignore[arg-type]
    in_decode, posted = threading.Event(), threading.Event()
    run = inproc.core.engine.runner.run

    def held_run(chunks, interrupt=None):
        if interrupt is not None and not posted.is_set():  # a decode step that may be given up
            in_decode.set()
            assert posted.wait(10)
        return run(chunks, interrupt)

    inproc.core.engine.runner.run = held_run  # type: ignore[method-assign]
    loop = threading.Thread(target=inproc.core.run)
    loop.start()
    tokens: dict[str, list[int]] = {"a": [], "b": []}
    try:
        inproc.send(wire.AddRequest("a", prompt_a, params(None), 1))
        assert in_decode.wait(10)
        inproc.send(wire.AddRequest("b", prompt_b, params(13), 1))
        posted.set()
        unfinished = {"a", "b"}
        while unfinished:
            message = inproc.receive()
            if isinstance(message, wire.StepOutputs):
                replay(message.events, metrics.for_model("tiny"))
                for rid, out in message.outputs:
                    tokens[rid] += out.new_token_ids
                    if out.finish_reason is not None:
                        unfinished.discard(rid)
        inproc.send(wire.Shutdown())
        loop.join(10)
    finally:
        posted.set()
        inproc.close()
    assert tokens == expected
    assert value(metrics, "gptserve:num_steps_interrupted_total") == 1
