"""The engine core driven step by step: batching, chunked prefill, prefix cache, preemption, aborts, failures.

The reference is models.generation (one batched prefill, then decode), which test_gpt2 checks against
transformers token for token.
"""

from __future__ import annotations

import random

import pytest
import torch

from models.generation import greedy_generate, prompt_logits
from models.loader import load_model
from server.engine.engine import EngineConfig, LLMEngine
from server.engine.errors import RequestRejected
from server.engine.outputs import ChoiceOutput
from server.engine.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def loaded(tiny_gpt2_dir, device):
    return load_model(tiny_gpt2_dir, dtype="float32", device=str(device))


def make_engine(loaded, **overrides) -> LLMEngine:
    config = EngineConfig(**({"kv_cache_tokens": 4096, "max_num_batched_tokens": 64, "block_size": 8} | overrides))
    return LLMEngine(loaded, config)


def run_all(engine: LLMEngine, max_steps: int = 10_000) -> dict[str, dict[int, list[ChoiceOutput]]]:
    results: dict[str, dict[int, list[ChoiceOutput]]] = {}
    for _ in range(max_steps):
        if not engine.has_work:
            return results
        for request_id, out in engine.step():
            results.setdefault(request_id, {}).setdefault(out.index, []).append(out)
    raise AssertionError("engine did not drain")


def tokens_of(outs: list[ChoiceOutput]) -> list[int]:
    return [t for o in outs for t in o.new_token_ids]


def random_prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(50257) for _ in range(n)]


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw)


def test_greedy_batch_of_64_mixed_lengths_equals_single_sequence_generation(loaded):
    engine = make_engine(loaded, max_num_seqs=64, kv_cache_tokens=16384, max_num_batched_tokens=512)
    prompts = [random_prompt(3 + (i * 7) % 90, seed=i) for i in range(64)]
    max_tokens = [20 + i % 17 for i in range(64)]  # long enough to outlast the admission of all 64
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, greedy(max_tokens[i]))
    results: dict[str, list[ChoiceOutput]] = {}
    most_running = 0
    while engine.has_work:
        for request_id, out in engine.step():
            results.setdefault(request_id, []).append(out)
        most_running = max(most_running, engine.stats().running)
    assert most_running == 64  # each request really shared its steps with the 63 others
    for i, prompt in enumerate(prompts):
        [expected] = greedy_generate(loaded.model, [prompt], max_tokens[i])
        outs = results[f"r{i}"]
        assert tokens_of(outs) == expected
        assert outs[-1].finish_reason == "length"
        assert outs[0].num_prompt_tokens == len(prompt)
    assert engine.block_manager.num_used_blocks == 0
    assert engine.stats().running == engine.stats().waiting == 0


def test_long_prompt_is_prefilled_in_chunks_without_stalling_decodes(loaded):
    """Only the step that admits the long prompt leaves the decode out; its later chunks share steps with it."""
    engine = make_engine(loaded, max_num_batched_tokens=16)
    engine.add_request("short", random_prompt(4, 1), greedy(20))
    engine.step()
    engine.step()  # short is now decoding (past its first decode, which is never held back)
    engine.add_request("long", random_prompt(100, 2), greedy(3))
    assert engine.step() == []  # long's first chunk alone
    for _ in range(5):  # the 100-token prompt needs >6 chunks of at most 16 tokens
        outputs = dict(engine.step())
        assert "long" not in outputs or not outputs["long"].new_token_ids
        assert outputs["short"].new_token_ids
    results = run_all(engine)
    assert tokens_of(results["long"][0]) == greedy_generate(loaded.model, [random_prompt(100, 2)], 3)[0]


def test_a_waiting_prompt_is_prefilled_before_the_running_sequences_decode(loaded):
    """A newcomer's first token costs its own prefill, not also the decode rows of everyone running."""
    engine = make_engine(loaded)
    for i in range(3):
        engine.add_request(f"old{i}", random_prompt(5 + i, 30 + i), greedy(10))
    engine.step()
    engine.step()  # their first decodes (a sequence's first decode is never held back: next test)
    engine.add_request("new", random_prompt(20, 40), greedy(4))
    first = dict(engine.step())
    assert list(first) == ["new"] and len(first["new"].new_token_ids) == 1
    second = dict(engine.step())
    assert sorted(second) == ["new", "old0", "old1", "old2"]  # everyone decodes again
    rest = run_all(engine)["new"][0]
    expected = greedy_generate(loaded.model, [random_prompt(20, 40)], 4)[0]
    assert tokens_of([first["new"], second["new"], *rest]) == expected


def test_a_sequence_decodes_right_after_its_prefill_even_while_prompts_wait(loaded):
    """Prompts prefilled in consecutive steps, with outputs of one length, must not run in step and finish in
    the same step (their clients would return together, and one of them wait for both prefills)."""
    engine = make_engine(loaded)
    engine.add_request("old", random_prompt(6, 70), greedy(10))
    engine.step()
    engine.step()
    tokens: dict[str, list[int]] = {}
    finished_at: dict[str, int] = {}

    def step(number: int) -> list[str]:
        outputs = engine.step()
        for request_id, out in outputs:
            tokens.setdefault(request_id, []).extend(out.new_token_ids)
            if out.finish_reason is not None:
                finished_at[request_id] = number
        return sorted(request_id for request_id, _ in outputs)

    engine.add_request("a", random_prompt(20, 71), greedy(6))
    assert step(0) == ["a"]  # old's decode waits for a's prefill
    engine.add_request("b", random_prompt(20, 72), greedy(6))
    assert step(1) == ["a", "b"]  # b's prefill, and a's first decode beside it; old waits again
    number = 2
    while engine.has_work:
        step(number)
        number += 1
    assert finished_at["a"] == finished_at["b"] - 1
    for request_id, seed in (("a", 71), ("b", 72)):
        assert tokens[request_id] == greedy_generate(loaded.model, [random_prompt(20, seed)], 6)[0]


def test_decodes_are_not_held_back_by_a_prompt_that_cannot_be_admitted(loaded):
    """No free sequence slot (or no blocks) for the waiting prompt: the running sequences keep decoding."""
    engine = make_engine(loaded, max_num_seqs=2)
    for i in range(3):
        engine.add_request(f"r{i}", random_prompt(6, 50 + i), greedy(5))
    engine.step()  # r0 and r1 admitted; r2 waits for a slot
    for _ in range(4):
        assert sorted(dict(engine.step())) == ["r0", "r1"]
    small = make_engine(loaded, kv_cache_tokens=32, block_size=8)  # 4 blocks
    small.add_request("a", random_prompt(20, 60), greedy(4))  # 3 blocks with its first tokens
    small.step()
    small.add_request("b", random_prompt(20, 61), greedy(4))  # 3 more blocks: it has to wait for a
    for _ in range(3):
        assert list(dict(small.step())) == ["a"]
    assert tokens_of(run_all(small)["b"][0]) == greedy_generate(loaded.model, [random_prompt(20, 61)], 4)[0]


def test_repeated_prompt_hits_prefix_cache_with_identical_output(loaded):
    engine = make_engine(loaded)
    prompt = random_prompt(70, 3)
    engine.add_request("cold", prompt, greedy(8))
    cold = run_all(engine)["cold"][0]
    engine.add_request("warm", prompt, greedy(8))
    warm = run_all(engine)["warm"][0]
    assert cold[0].num_cached_tokens == 0
    assert warm[0].num_cached_tokens == 64  # all full blocks of 8 but the one holding the last prompt token
    assert tokens_of(warm) == tokens_of(cold)


def test_shared_system_prompt_reuses_blocks_across_different_requests(loaded):
    engine = make_engine(loaded)
    system = random_prompt(40, 4)
    engine.add_request("a", system + random_prompt(9, 5), greedy(4))
    run_all(engine)
    b_prompt = system + random_prompt(13, 6)
    engine.add_request("b", b_prompt, greedy(4))
    b = run_all(engine)["b"][0]
    assert b[0].num_cached_tokens == 40
    assert tokens_of(b) == greedy_generate(loaded.model, [b_prompt], 4)[0]


def test_kv_pool_too_small_for_all_preempts_and_everyone_finishes_correctly(loaded):
    engine = make_engine(loaded, kv_cache_tokens=160, max_num_batched_tokens=64)
    prompts = [random_prompt(30 + i, seed=20 + i) for i in range(8)]
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, greedy(30))
    results = run_all(engine)
    assert engine.scheduler.num_preemptions > 0
    for i, prompt in enumerate(prompts):
        assert tokens_of(results[f"r{i}"][0]) == greedy_generate(loaded.model, [prompt], 30)[0]
    assert engine.block_manager.num_used_blocks == 0


def first_output_order(engine: LLMEngine) -> list[str]:
    """Request ids in the order their first token came out, running the engine dry."""
    order: list[str] = []
    while engine.has_work:
        order += [request_id for request_id, out in engine.step() if out.new_token_ids and request_id not in order]
    return order


@pytest.mark.parametrize("policy", ["fcfs", "priority"])
def test_the_queue_admits_by_policy(loaded, policy):
    """vLLM's priority scheduling: lower priority values first, ties in arrival order; fcfs keeps arrival order."""
    engine = make_engine(loaded, max_num_seqs=1, scheduling_policy=policy)
    engine.add_request("first", random_prompt(8, seed=1), greedy(4))
    engine.step()  # "first" runs; the rest queue behind it
    priorities = {"late": 5, "urgent": -1, "urgent too": -1, "plain": 0}
    for request_id, priority in priorities.items():
        engine.add_request(request_id, random_prompt(8, seed=2), greedy(4, priority=priority if policy != "fcfs"
                                                                          else 0))
    expected = ["urgent", "urgent too", "plain", "late"] if policy == "priority" else list(priorities)
    assert first_output_order(engine) == ["first", *expected]


@pytest.mark.parametrize("policy", ["fcfs", "priority"])
def test_preemption_takes_the_least_urgent_running_sequence(loaded, policy):
    """Out of blocks, fcfs preempts the newest running sequence and priority the least urgent; either way every
    output equals the reference."""
    engine = make_engine(loaded, kv_cache_tokens=160, max_num_batched_tokens=64, scheduling_policy=policy)
    prompts = {"old": random_prompt(30, seed=3), "low": random_prompt(30, seed=4), "new, urgent": random_prompt(30, 5)}
    priorities = {"old": 0, "low": 1, "new, urgent": -1} if policy == "priority" else dict.fromkeys(prompts, 0)
    results: dict[str, list[ChoiceOutput]] = {}
    for request_id, prompt in prompts.items():  # each admitted before the next arrives
        engine.add_request(request_id, prompt, greedy(40, priority=priorities[request_id]))
        for out_id, out in engine.step():
            results.setdefault(out_id, []).append(out)
    preempted: set[str] = set()
    while engine.has_work:
        running = set(engine.requests) - {seq.request_id for seq in engine.scheduler.waiting}
        for request_id, out in engine.step():
            results.setdefault(request_id, []).append(out)
        preempted |= running & {seq.request_id for seq in engine.scheduler.waiting}
    assert preempted == ({"low"} if policy == "priority" else {"new, urgent"})
    for request_id, prompt in prompts.items():
        assert tokens_of(results[request_id]) == greedy_generate(loaded.model, [prompt], 40)[0]


def test_a_priority_needs_the_priority_policy(loaded):
    with pytest.raises(RequestRejected, match="--scheduling-policy priority") as refused:
        make_engine(loaded).validate(4, greedy(4, priority=-3), 1)
    assert refused.value.param == "priority"
    make_engine(loaded, scheduling_policy="priority").validate(4, greedy(4, priority=-3), 1)


def greedy_avoiding(loaded, prompt: list[int], max_tokens: int, bad_words: list[tuple[int, ...]]) -> list[int]:
    """The reference for bad_words: greedy over the full forward's logits, a bad word's last token masked where the
    output ends with the rest of it."""
    out: list[int] = []
    for _ in range(max_tokens):
        logits = prompt_logits(loaded.model, [prompt + out])[0][-1, :50257].clone()
        for *prefix, last in bad_words:
            if len(prefix) <= len(out) and out[len(out) - len(prefix):] == prefix:
                logits[last] = float("-inf")
        out.append(int(logits.argmax()))
    return out


def test_bad_words_are_never_completed_and_the_rest_is_greedy(loaded):
    prompt = random_prompt(12, seed=6)
    [plain] = greedy_generate(loaded.model, [prompt], 8)
    cases = {"one token": [(plain[0],)], "two tokens": [(plain[3], plain[4]), (plain[7], plain[6], plain[5])]}
    engine = make_engine(loaded)
    for request_id, bad_words in cases.items():
        engine.add_request(request_id, prompt, greedy(8, bad_words=tuple(bad_words)))
    results = run_all(engine)
    for request_id, bad_words in cases.items():
        assert tokens_of(results[request_id][0]) == greedy_avoiding(loaded, prompt, 8, bad_words)
    assert tokens_of(results["one token"][0])[0] != plain[0]
    two = tokens_of(results["two tokens"][0])
    assert two[:4] == plain[:4] and two[4] != plain[4]  # banned only after its first token
    assert engine.block_manager.num_used_blocks == 0


def test_bad_words_with_a_constraint_or_allowed_ids_are_rejected(loaded):
    engine = make_engine(loaded)
    with pytest.raises(RequestRejected, match="bad_words cannot be combined with allowed_token_ids"):
        engine.validate(4, greedy(4, bad_words=((5,),), allowed_token_ids=(5, 6)), 1)


def test_request_that_can_never_fit_is_rejected_up_front(loaded):
    engine = make_engine(loaded, kv_cache_tokens=64)
    with pytest.raises(RequestRejected, match="never fit"):
        engine.validate(60, greedy(10), 1)
    with pytest.raises(RequestRejected, match="maximum context length is 128"):
        make_engine(loaded).validate(100, greedy(29), 1)


def test_n_choices_that_cannot_fit_the_cache_together_are_rejected_naming_n(loaded):
    engine = make_engine(loaded, kv_cache_tokens=256, block_size=8)  # 32 blocks; each choice below needs 13
    with pytest.raises(RequestRejected, match="8 choices running at once x 101 tokens .* can never fit .* lower n") \
            as refused:
        engine.validate(1, greedy(100), 8)
    assert refused.value.param == "n"
    engine.validate(1, greedy(100), 2)
    two_slots = make_engine(loaded, kv_cache_tokens=256, block_size=8, max_num_seqs=2)
    two_slots.validate(1, greedy(100), 8)  # two run at once; the others wait for the blocks they free
    two_slots.add_request("n8", [1], greedy(100, ignore_eos=True), 8)
    finished = run_all(two_slots)["n8"]
    assert len(finished) == 8 and two_slots.scheduler.num_preemptions == 0
    long_prompt = make_engine(loaded, kv_cache_tokens=128, block_size=8)  # the choices share 11 prompt blocks
    long_prompt.validate(90, greedy(10), 2)  # 13 + 2 blocks of the 16 (26 without sharing)
    with pytest.raises(RequestRejected, match="lower n"):
        long_prompt.validate(90, greedy(10), 3)  # 13 + 2 x 2 > 16


def test_a_request_without_max_tokens_gets_what_the_cache_holds_for_all_its_choices(loaded):
    engine = make_engine(loaded, kv_cache_tokens=64, block_size=8)  # 8 blocks, under the 128-token context
    assert engine.admission.default_max_tokens(10, 1) == 54
    assert engine.admission.default_max_tokens(10, 2) == 22  # 4 blocks each, sharing the prompt's full block
    engine.validate(10, greedy(22), 2)
    with pytest.raises(RequestRejected):
        engine.validate(10, greedy(23), 2)
    assert make_engine(loaded).admission.default_max_tokens(100, 3) == 28  # the context bounds it first
    assert engine.admission.default_max_tokens(70, 1) == 0  # not even the prompt fits: validate says why


def test_echoed_prompt_logprobs_beyond_the_bound_are_rejected_naming_what_to_lower(loaded):
    engine = make_engine(loaded)
    echo = SamplingParams(max_tokens=1, prompt_logprobs=20)
    with pytest.raises(RequestRejected, match=r"n \(128\) x prompt tokens \(100\) x \(logprobs \+ 1\) \(21\)") as e:
        engine.validate(100, echo, 128)
    assert e.value.param == "logprobs"
    engine.validate(100, echo, 64)


def test_abort_frees_blocks_and_reports_abort(loaded):
    engine = make_engine(loaded)
    engine.add_request("x", random_prompt(50, 7), greedy(100))
    engine.step()
    engine.step()
    assert engine.block_manager.num_used_blocks > 0
    [(request_id, out)] = engine.abort("x")
    assert (request_id, out.finish_reason) == ("x", "abort")
    assert engine.block_manager.num_used_blocks == 0 and not engine.has_work


def test_stop_token_ends_choice_as_its_last_output_token(loaded):
    """As vLLM reports it: the stop token is generated (counted, scored), and named as the one that stopped."""
    engine = make_engine(loaded)
    prompt = random_prompt(10, 8)
    [free_run] = greedy_generate(loaded.model, [prompt], 6)
    engine.add_request("s", prompt, greedy(6, stop_token_ids=frozenset({free_run[3]}), logprobs=0))
    outs = run_all(engine)["s"][0]
    assert tokens_of(outs) == free_run[:4]
    assert [lp.token_id for o in outs for lp in o.logprobs] == free_run[:4]
    assert outs[-1].finish_reason == "stop" and outs[-1].stop_token_id == free_run[3]
    assert all(o.stop_token_id is None for o in outs[:-1])


def test_stop_choice_ends_only_that_choice_and_reports_it(loaded):
    engine = make_engine(loaded)
    engine.add_request("two", random_prompt(10, 15), SamplingParams(max_tokens=20, temperature=1.0, seed=1), n=2)
    engine.step()
    assert engine.stop_choice("two", 1) == [("two", ChoiceOutput(1, [], finish_reason="stop"))]
    assert engine.stop_choice("two", 1) == []
    results = run_all(engine)
    assert results["two"][0][-1].finish_reason == "length" and 1 not in results["two"]
    assert engine.block_manager.num_used_blocks == 0


def test_min_tokens_and_ignore_eos_force_the_length(loaded):
    engine = make_engine(loaded)
    prompt = random_prompt(10, 8)
    [free_run] = greedy_generate(loaded.model, [prompt], 6)
    engine.add_request("m", prompt, greedy(6, stop_token_ids=frozenset({free_run[0]}), ignore_eos=True))
    outs = run_all(engine)["m"][0]
    assert len(tokens_of(outs)) == 6 and outs[-1].finish_reason == "length"


def test_prompt_logprobs_with_zero_max_tokens_match_full_forward(loaded):
    engine = make_engine(loaded, max_num_batched_tokens=16)  # scored across several chunks
    prompt = random_prompt(45, 9)
    engine.add_request("p", prompt, SamplingParams(max_tokens=0, prompt_logprobs=2))
    [out] = run_all(engine)["p"][0]
    assert out.finish_reason == "length" and out.new_token_ids == []
    expected = torch.log_softmax(prompt_logits(loaded.model, [prompt])[0], dim=-1)
    assert out.prompt_logprobs[0] is None
    for i, entry in enumerate(out.prompt_logprobs[1:], start=1):
        assert entry.token_id == prompt[i]
        assert abs(entry.logprob - expected[i - 1, prompt[i]].item()) < 1e-4
        assert [t for t, _ in entry.top] == expected[i - 1].topk(2).indices.tolist()


def test_an_embedding_request_reports_its_last_prompt_tokens_hidden_state_and_samples_nothing(
        loaded, gpt2_oracle, monkeypatch):
    """Over several prompt chunks, beside another embedding request: no logits are computed for either, the
    hidden state is transformers' final (normed) one at the last prompt token, and the blocks come back."""
    engine = make_engine(loaded, max_num_batched_tokens=16)
    logits_rows = []
    real_logits = engine.runner._logits
    monkeypatch.setattr(engine.runner, "_logits", lambda hidden: logits_rows.append(len(hidden)) or real_logits(hidden))
    prompts = {"long": random_prompt(45, 10), "short": random_prompt(3, 11)}
    for request_id, prompt in prompts.items():
        engine.add_request(request_id, prompt, SamplingParams(max_tokens=0, temperature=0.0, embed=True))
    results = run_all(engine)
    for request_id, prompt in prompts.items():
        [out] = results[request_id][0]
        assert out.finish_reason == "length" and out.new_token_ids == [] and out.num_prompt_tokens == len(prompt)
        with torch.no_grad():
            expected = gpt2_oracle.transformer(torch.tensor([prompt])).last_hidden_state[0, -1]
        torch.testing.assert_close(torch.tensor(out.embedding), expected, rtol=1e-4, atol=1e-4)
    assert logits_rows == []
    assert engine.block_manager.num_used_blocks == 0


def test_sampled_logprobs_report_raw_distribution(loaded):
    engine = make_engine(loaded)
    prompt = random_prompt(12, 10)
    engine.add_request("l", prompt, greedy(1, logprobs=3))
    [out] = run_all(engine)["l"][0]
    expected = torch.log_softmax(prompt_logits(loaded.model, [prompt])[0][-1], dim=-1)
    [entry] = out.logprobs
    assert entry.token_id == expected.argmax().item()
    assert abs(entry.logprob - expected.max().item()) < 1e-4
    assert [t for t, _ in entry.top] == expected.topk(3).indices.tolist()


def test_seed_reproduces_the_output_when_the_batches_are_the_same(loaded):
    """Exactly what a seed promises (docs/api.md). Across different batches the logits move by ~1e-5, which can
    flip a token, so equality with the request run alone is not a promise and is not asserted."""
    params = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, top_k=50, seed=1234)
    prompt = random_prompt(15, 11)

    def crowded() -> list[int]:
        engine = make_engine(loaded)
        for i in range(10):
            engine.add_request(f"other{i}", random_prompt(5 + i, 30 + i),
                               SamplingParams(max_tokens=12, temperature=1.0, seed=i))
        engine.add_request("s", prompt, params)
        return tokens_of(run_all(engine)["s"][0])

    assert crowded() == crowded()


def test_n_choices_share_prompt_blocks_and_differ_by_seed(loaded):
    engine = make_engine(loaded)
    engine.add_request("n", random_prompt(33, 12), SamplingParams(max_tokens=10, temperature=1.0, seed=7), n=3)
    choices = run_all(engine)["n"]
    assert sorted(choices) == [0, 1, 2]
    assert [choices[i][0].num_cached_tokens for i in range(3)] == [0, 32, 32]
    assert len({tuple(tokens_of(choices[i])) for i in range(3)}) > 1


def test_failed_forward_fails_only_that_step_and_engine_keeps_serving(loaded, monkeypatch):
    engine = make_engine(loaded)
    engine.add_request("doomed", random_prompt(20, 13), greedy(5))
    original = engine.runner.run

    def broken(chunks, interrupt=None):
        raise RuntimeError("injected fault")

    monkeypatch.setattr(engine.runner, "run", broken)
    [(request_id, out)] = engine.step()
    assert (request_id, out.finish_reason) == ("doomed", "error") and "injected fault" in out.error
    assert engine.block_manager.num_used_blocks == 0 and not engine.block_manager.cached
    monkeypatch.setattr(engine.runner, "run", original)
    prompt = random_prompt(20, 13)
    engine.add_request("after", prompt, greedy(5))
    assert tokens_of(run_all(engine)["after"][0]) == greedy_generate(loaded.model, [prompt], 5)[0]


def test_echoed_prompt_is_scored_once_and_shared_by_all_choices(loaded):
    engine = make_engine(loaded, max_num_batched_tokens=16)  # the first choice scores it over several chunks
    prompt = random_prompt(33, 16)
    engine.add_request("e", prompt, SamplingParams(max_tokens=3, temperature=1.0, seed=3, prompt_logprobs=2), n=3)
    choices = run_all(engine)["e"]
    firsts = [choices[i][0] for i in range(3)]
    assert [o.num_cached_tokens for o in firsts] == [0, 32, 32]  # the others computed only the last token
    assert firsts[0].prompt_logprobs[1:] and all(o.prompt_logprobs == firsts[0].prompt_logprobs for o in firsts)
    expected = torch.log_softmax(prompt_logits(loaded.model, [prompt])[0], dim=-1)
    assert abs(firsts[2].prompt_logprobs[-1].logprob - expected[-2, prompt[-1]].item()) < 1e-4
    assert engine.block_manager.num_used_blocks == 0 and not engine.held


def test_aborting_an_echo_request_ends_its_held_choices_too(loaded):
    engine = make_engine(loaded, max_num_batched_tokens=16)
    engine.add_request("e", random_prompt(40, 17), SamplingParams(max_tokens=3, prompt_logprobs=0), n=3)
    engine.step()
    assert sorted(out.index for _, out in engine.abort("e")) == [0, 1, 2]
    assert not engine.has_work and not engine.held and not engine.requests


def test_a_row_whose_sampling_raises_fails_only_its_own_request(loaded, monkeypatch):
    engine = make_engine(loaded)
    prompts = {f"ok{i}": random_prompt(8 + i, 80 + i) for i in range(3)}
    for request_id, prompt in prompts.items():
        engine.add_request(request_id, prompt, greedy(4))
    engine.add_request("bad", random_prompt(9, 90), SamplingParams(max_tokens=4, temperature=1.0), n=2)
    real = engine.sampler

    def sampler(logits, seqs):
        if any(seq.request_id == "bad" for seq in seqs):
            raise RuntimeError("injected sampling fault")
        return real(logits, seqs)

    monkeypatch.setattr(engine, "sampler", sampler)
    results = run_all(engine)
    assert sorted(results["bad"]) == [0, 1]
    for outs in results["bad"].values():
        assert [(o.finish_reason, "injected sampling fault" in o.error) for o in outs] == [("error", True)]
    for request_id, prompt in prompts.items():
        assert tokens_of(results[request_id][0]) == greedy_generate(loaded.model, [prompt], 4)[0]
    assert engine.block_manager.num_used_blocks == 0 and not engine.has_work


def test_top_k_beyond_int64_shares_a_step_with_other_requests_and_all_finish(loaded):
    engine = make_engine(loaded)
    prompts = {f"ok{i}": random_prompt(8 + i, 100 + i) for i in range(3)}
    for request_id, prompt in prompts.items():
        engine.add_request(request_id, prompt, greedy(4))
    engine.add_request("huge", random_prompt(9, 110), SamplingParams(max_tokens=4, top_k=2**63, seed=1))
    results = run_all(engine)
    assert [o.finish_reason for o in results["huge"][0]][-1] == "length"
    for request_id, prompt in prompts.items():
        assert tokens_of(results[request_id][0]) == greedy_generate(loaded.model, [prompt], 4)[0]


def test_penalties_and_logit_bias_steer_greedy_choice(loaded):
    engine = make_engine(loaded)
    prompt = random_prompt(10, 14)
    [free_run] = greedy_generate(loaded.model, [prompt], 1)
    engine.add_request("bias", prompt, greedy(1, logit_bias={free_run[0]: -100.0, 42: 100.0}))
    assert tokens_of(run_all(engine)["bias"][0]) == [42]
    engine.add_request("rep", [42] * 10, greedy(8, frequency_penalty=50.0, presence_penalty=50.0))
    out = tokens_of(run_all(engine)["rep"][0])
    assert len(set(out)) == len(out)  # penalties far above the logit range forbid any repeat


def test_penalty_arithmetic_matches_openai_and_ctrl_definitions():
    from server.engine.sampler import Sampler
    from server.engine.sequence import Sequence

    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=2.0)
    seq = Sequence("r", 0, [1, 3, 3, 2], 1, params, 0.0)  # prompt [1]; outputs 3, 3, 2
    got = Sampler._apply_penalties(logits.clone(), [seq])
    # repetition (CTRL) on every seen token: positive / 2, negative * 2; then OpenAI's count and presence terms
    expected = torch.tensor([[2.0, -2.0, 0.25 - 0.25 - 0.5, 1.5 - 0.5 - 0.5]])
    assert torch.allclose(got, expected)
