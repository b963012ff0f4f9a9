"""POST /v1/completions against a real server: greedy output and logprobs equal transformers on the same weights."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
import torch

from server.detokenizer import token_text
from tests.server_process import ServerProcess

EOS = 50256
PROMPTS = ["Hello, my name is", "The capital of France", "1 2 3 4 5 6 7 8 9 10 11 12", "Once"]


@pytest.fixture(scope="module")
def server(tiny_gpt2_dir):
    with ServerProcess(["--model", f"tiny={tiny_gpt2_dir}", "--max-num-seqs", "16", "--scheduling-policy",
                        "priority"]) as running:
        yield running


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0)


@torch.no_grad()
def oracle_logprobs(gpt2_oracle, ids: list[int]) -> torch.Tensor:
    """log_softmax of the next-token logits at every position: [len(ids), vocab]."""
    return torch.log_softmax(gpt2_oracle(torch.tensor([ids])).logits[0].double(), -1)


def oracle_greedy(gpt2_oracle, prompt: list[int], max_new_tokens: int) -> list[int]:
    out: list[int] = []
    for _ in range(max_new_tokens):
        token = int(oracle_logprobs(gpt2_oracle, prompt + out)[-1].argmax())
        if token == EOS:
            break
        out.append(token)
    return out


def test_greedy_string_prompt_equals_transformers(client, gpt2_tokenizer, gpt2_oracle):
    prompt = PROMPTS[0]
    expected = oracle_greedy(gpt2_oracle, gpt2_tokenizer.encode(prompt), 12)
    result = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0, logprobs=0)
    choice = result.choices[0]
    assert choice.text == gpt2_tokenizer.decode(expected)
    assert choice.logprobs.tokens == [token_text(gpt2_tokenizer, t) for t in expected]
    assert choice.finish_reason == ("length" if len(expected) == 12 else "stop")
    assert result.usage.prompt_tokens == len(gpt2_tokenizer.encode(prompt))
    assert result.usage.completion_tokens == len(expected)
    assert result.usage.total_tokens == result.usage.prompt_tokens + len(expected)


def test_token_id_and_batched_prompts_number_choices_prompt_major(client, gpt2_tokenizer, gpt2_oracle):
    id_prompts = [gpt2_tokenizer.encode(p) for p in PROMPTS]
    expected = [gpt2_tokenizer.decode(oracle_greedy(gpt2_oracle, ids, 8)) for ids in id_prompts]
    single = client.completions.create(model="tiny", prompt=id_prompts[1], max_tokens=8, temperature=0)
    assert single.choices[0].text == expected[1]
    for prompt in (PROMPTS, id_prompts):
        batch = client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0)
        assert [c.index for c in batch.choices] == list(range(len(PROMPTS)))
        assert [c.text for c in batch.choices] == expected
        assert batch.usage.prompt_tokens == sum(len(ids) for ids in id_prompts)


def test_logprobs_equal_log_softmax_of_transformers_logits(client, gpt2_tokenizer, gpt2_oracle):
    prompt = gpt2_tokenizer.encode(PROMPTS[1])
    result = client.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0, logprobs=5)
    logprobs = result.choices[0].logprobs
    generated = prompt[:]
    for token, token_logprob, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs):
        reference = oracle_logprobs(gpt2_oracle, generated)[-1]
        best = reference.topk(5)
        token_id = int(best.indices[0])
        assert token == token_text(gpt2_tokenizer, token_id)
        assert token_logprob == pytest.approx(float(reference[token_id]), abs=1e-4)
        expected_top = {token_text(gpt2_tokenizer, int(i)): float(v) for v, i in zip(best.values, best.indices)}
        assert top.keys() == expected_top.keys()
        assert all(top[k] == pytest.approx(v, abs=1e-4) for k, v in expected_top.items())
        generated.append(token_id)
    assert logprobs.text_offset[0] == 0
    assert logprobs.text_offset[1] == len(logprobs.tokens[0])


def test_echo_logprobs_with_zero_max_tokens_scores_the_prompt(client, gpt2_tokenizer, gpt2_oracle):
    """lm-evaluation-harness's loglikelihood request."""
    prompt = PROMPTS[2]
    ids = gpt2_tokenizer.encode(prompt)
    result = client.completions.create(model="tiny", prompt=prompt, max_tokens=0, echo=True, logprobs=1)
    choice = result.choices[0]
    assert choice.text == prompt
    assert choice.logprobs.tokens == [token_text(gpt2_tokenizer, t) for t in ids]
    assert choice.logprobs.token_logprobs[0] is None
    reference = oracle_logprobs(gpt2_oracle, ids)
    expected = [float(reference[i - 1, ids[i]]) for i in range(1, len(ids))]
    assert choice.logprobs.token_logprobs[1:] == pytest.approx(expected, abs=1e-4)
    assert result.usage.completion_tokens == 0


def test_concurrent_mixed_requests_equal_their_single_answers(server, client):
    bodies = [{"model": "tiny", "prompt": PROMPTS[i % 4] * (1 + i % 3), "max_tokens": 4 + i % 9, "temperature": 0}
              for i in range(32)]
    singles = [client.completions.create(**body).choices[0].text for body in bodies]

    async def all_at_once() -> list[str]:
        async with httpx.AsyncClient(base_url=server.v1, timeout=120) as http:
            responses = await asyncio.gather(*(http.post("/completions", json=body) for body in bodies))
        return [r.json()["choices"][0]["text"] for r in responses]

    assert asyncio.run(all_at_once()) == singles


def test_n_choices_with_seed_are_reproducible(client):
    kwargs = {"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 10, "temperature": 1.0, "n": 3, "seed": 1234}
    first = client.completions.create(**kwargs)
    second = client.completions.create(**kwargs)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.text for c in first.choices] == [c.text for c in second.choices]
    assert len({c.text for c in first.choices}) > 1


def test_stop_string_truncates_and_finishes_with_stop(client, gpt2_tokenizer, gpt2_oracle):
    full = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=12, temperature=0).choices[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    result = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=12, temperature=0,
                                       stop=[stop, "never appears"])
    assert result.choices[0].text == full[: full.index(stop)]
    assert result.choices[0].finish_reason == "stop"


def test_include_stop_str_in_output_keeps_the_stop_string_streamed_or_not(client):
    full = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=12, temperature=0).choices[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    body = dict(model="tiny", prompt=PROMPTS[0], max_tokens=12, temperature=0, stop=[stop],
                extra_body={"include_stop_str_in_output": True})
    result = client.completions.create(**body)
    assert result.choices[0].text == full[: full.index(stop) + len(stop)]
    assert result.choices[0].finish_reason == "stop"
    streamed = "".join(chunk.choices[0].text for chunk in client.completions.create(**body, stream=True))
    assert streamed == result.choices[0].text


def test_stop_reason_names_the_stop_string_or_stop_token_that_ended_a_choice(client, gpt2_tokenizer, gpt2_oracle):
    """vLLM's stop_reason; a stop token is an output token (counted, scored, in token_ids) without text."""
    expected = oracle_greedy(gpt2_oracle, gpt2_tokenizer.encode(PROMPTS[0]), 8)
    assert len(expected) == 8 and expected[4] not in expected[:4]
    body = dict(model="tiny", prompt=PROMPTS[0], max_tokens=8, temperature=0, logprobs=0)
    by_token = client.completions.create(**body, extra_body={"stop_token_ids": [expected[4]],
                                                             "return_token_ids": True}).choices[0]
    assert (by_token.finish_reason, by_token.stop_reason) == ("stop", expected[4])
    assert by_token.token_ids == expected[:5]
    assert by_token.text == gpt2_tokenizer.decode(expected[:4])
    assert by_token.logprobs.tokens == [token_text(gpt2_tokenizer, t) for t in expected[:5]]
    kept = client.completions.create(**body, extra_body={"stop_token_ids": [expected[4]],
                                                         "include_stop_str_in_output": True}).choices[0]
    assert kept.text == gpt2_tokenizer.decode(expected[:5])
    full = gpt2_tokenizer.decode(expected)
    stop = gpt2_tokenizer.decode(expected[5:7])
    assert full.index(stop) == len(gpt2_tokenizer.decode(expected[:5]))
    by_string = client.completions.create(**body, stop=[stop], extra_body={"return_token_ids": True}).choices[0]
    assert (by_string.finish_reason, by_string.stop_reason) == ("stop", stop)
    assert by_string.text == full[: full.index(stop)]
    assert by_string.token_ids == expected[:7]  # up to the token that completed the stop string, no further
    assert len(by_string.logprobs.tokens) == 7
    by_length = client.completions.create(**(body | {"max_tokens": 3}))
    assert (by_length.choices[0].finish_reason, by_length.choices[0].stop_reason) == ("length", None)
    assert by_length.usage.completion_tokens == 3


def test_ignore_eos_passes_the_models_end_token_but_not_the_clients_stop_token_ids(client, gpt2_tokenizer,
                                                                                     gpt2_oracle):
    """As vLLM stops: ignore_eos is about the end-of-text token, and a stop token the client asked for still ends."""
    expected = oracle_greedy(gpt2_oracle, gpt2_tokenizer.encode(PROMPTS[0]), 8)
    body = dict(model="tiny", prompt=PROMPTS[0], max_tokens=8, temperature=0)
    stopped = client.completions.create(**body, extra_body={"ignore_eos": True, "stop_token_ids": [expected[4]],
                                                            "return_token_ids": True}).choices[0]
    assert (stopped.finish_reason, stopped.stop_reason, stopped.token_ids) == ("stop", expected[4], expected[:5])
    past_eos = client.completions.create(**body, extra_body={"ignore_eos": True, "allowed_token_ids": [EOS],
                                                             "stop_token_ids": [expected[4]]})
    assert (past_eos.choices[0].finish_reason, past_eos.usage.completion_tokens) == ("length", 8)


def test_eos_is_an_output_token_counted_and_scored_without_text(client, gpt2_tokenizer):
    """Only end-of-text allowed: the choice is that one token, stopped by the model's own token (no stop_reason)."""
    result = client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=5, temperature=0, logprobs=0,
                                       extra_body={"allowed_token_ids": [EOS], "return_token_ids": True})
    choice = result.choices[0]
    assert (choice.text, choice.token_ids, choice.finish_reason, choice.stop_reason) == ("", [EOS], "stop", None)
    assert choice.logprobs.tokens == ["<|endoftext|>"] and choice.logprobs.text_offset == [0]
    assert result.usage.completion_tokens == 1


def test_return_token_ids_gives_prompt_and_output_ids_streamed_or_not(server, client, gpt2_tokenizer):
    prompts = [PROMPTS[2], PROMPTS[3]]
    body = dict(model="tiny", prompt=prompts, max_tokens=6, temperature=0, n=2, logprobs=0)
    whole = client.completions.create(**body, extra_body={"return_token_ids": True, "return_tokens_as_token_ids":
                                                          True})
    prompt_ids = [gpt2_tokenizer.encode(prompt) for prompt in prompts]
    for choice in whole.choices:
        assert choice.prompt_token_ids == prompt_ids[choice.index // 2]
        assert choice.logprobs.tokens == [f"token_id:{t}" for t in choice.token_ids]
        assert gpt2_tokenizer.decode(choice.token_ids).startswith(choice.text)
    assert whole.usage.completion_tokens == sum(len(c.token_ids) for c in whole.choices)
    streamed: dict[int, list[int]] = {i: [] for i in range(4)}
    firsts: dict[int, list[int]] = {}
    with httpx.stream("POST", server.v1 + "/completions", timeout=60,
                      json=body | {"stream": True, "return_token_ids": True}) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                choice = json.loads(line[len("data: "):])["choices"][0]
                if choice["index"] not in firsts:
                    firsts[choice["index"]] = choice["prompt_token_ids"]
                else:
                    assert "prompt_token_ids" not in choice, choice
                streamed[choice["index"]] += choice["token_ids"]
    assert firsts == {c.index: c.prompt_token_ids for c in whole.choices}
    assert streamed == {c.index: c.token_ids for c in whole.choices}
    plain = client.completions.create(**body).model_dump(exclude_unset=True)
    assert "token_ids" not in plain["choices"][0] and "prompt_token_ids" not in plain["choices"][0]


def test_return_tokens_as_token_ids_names_each_token_by_its_id(client, gpt2_tokenizer):
    """Prompt (echo) and output tokens and their alternatives; the offsets stay those of the text."""
    body = dict(model="tiny", prompt=PROMPTS[0], max_tokens=6, temperature=0, logprobs=2, echo=True)
    plain = client.completions.create(**body).choices[0]
    named = client.completions.create(**body, extra_body={"return_tokens_as_token_ids": True}).choices[0]
    ids = gpt2_tokenizer.encode(PROMPTS[0]) + gpt2_tokenizer.encode(plain.text[len(PROMPTS[0]):])
    assert named.text == plain.text
    assert named.logprobs.tokens == [f"token_id:{i}" for i in ids]
    assert named.logprobs.text_offset == plain.logprobs.text_offset
    assert named.logprobs.token_logprobs == plain.logprobs.token_logprobs
    for top, plain_top in zip(named.logprobs.top_logprobs[1:], plain.logprobs.top_logprobs[1:]):
        assert sorted(top.values()) == sorted(plain_top.values())
        assert all(key.startswith("token_id:") for key in top)


def test_truncate_prompt_tokens_keeps_the_prompts_last_tokens(server, client):
    ids = list(range(1000, 1040))
    body = dict(model="tiny", max_tokens=3, temperature=0, echo=True)
    cut = client.completions.create(prompt=ids, **body, extra_body={"truncate_prompt_tokens": 8})
    assert cut.usage.prompt_tokens == 8
    assert cut.choices[0].text == client.completions.create(prompt=ids[-8:], **body).choices[0].text
    max_model_len = client.models.list().data[0].max_model_len
    whole_context = client.completions.create(model="tiny", prompt=list(range(1000, 1000 + max_model_len + 50)),
                                              max_tokens=0, echo=True, extra_body={"truncate_prompt_tokens": -1})
    assert whole_context.usage.prompt_tokens == max_model_len
    refused = httpx.post(server.v1 + "/completions", timeout=30,
                         json={"model": "tiny", "prompt": "x", "truncate_prompt_tokens": 0})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "truncate_prompt_tokens"


def test_allowed_token_ids_limit_every_sampled_token(server, client, gpt2_tokenizer):
    allowed = gpt2_tokenizer.encode(" yes no maybe")
    result = client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=6, temperature=1.0, seed=3, n=3,
                                       logprobs=0, extra_body={"allowed_token_ids": allowed})
    for choice in result.choices:
        ids = [gpt2_tokenizer.encode(token)[0] for token in choice.logprobs.tokens]
        assert len(ids) == 6 and set(ids) <= set(allowed), choice.logprobs.tokens
    for extra in ({"allowed_token_ids": [50257]},  # outside the vocabulary
                  {"allowed_token_ids": [15], "response_format": {"type": "json_object"}},  # found by the fuzzer: 500
                  {"allowed_token_ids": [EOS], "min_tokens": 2}):  # nothing left to pick
        refused = httpx.post(server.v1 + "/completions", timeout=30, json={"model": "tiny", "prompt": "x"} | extra)
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "allowed_token_ids", refused.text


def test_repeated_long_prompt_hits_prefix_cache_with_identical_output(client):
    prompt = " ".join(str(i) for i in range(40))  # ~80 tokens: several full KV blocks
    first = client.completions.create(model="tiny", prompt=prompt, max_tokens=5, temperature=0)
    second = client.completions.create(model="tiny", prompt=prompt, max_tokens=5, temperature=0)
    assert second.choices[0].text == first.choices[0].text
    assert second.usage.prompt_tokens_details.cached_tokens > 0
    assert second.usage.prompt_tokens_details.cached_tokens < second.usage.prompt_tokens


def test_cache_salt_shares_cached_prompt_blocks_only_with_the_same_salt(client):
    prompt = " ".join(str(i) for i in range(100, 140))  # several full KV blocks, in no other test

    def cached(salt: str | None) -> tuple[int, str]:
        extra = {} if salt is None else {"cache_salt": salt}
        result = client.completions.create(model="tiny", prompt=prompt, max_tokens=3, temperature=0, extra_body=extra)
        return result.usage.prompt_tokens_details.cached_tokens, result.choices[0].text

    first, text = cached("tenant-a")
    assert first == 0
    assert cached(None) == (0, text)
    assert cached("tenant-b") == (0, text)
    again, _ = cached("tenant-a")
    assert again > 0 and cached(None)[0] > 0
    with pytest.raises(openai.BadRequestError, match="cache_salt"):
        client.completions.create(model="tiny", prompt=prompt, max_tokens=1, extra_body={"cache_salt": ""})


def test_models_lists_the_served_model_with_its_context(client):
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny"]
    assert models[0].max_model_len == 128
    assert client.models.retrieve("tiny").id == "tiny"


def assert_prompt_logprobs_equal_oracle(entries, ids: list[int], k: int, gpt2_oracle, name) -> None:
    """vLLM's prompt_logprobs: null first, then per token its own entry (logprob, rank) and its k likeliest."""
    assert len(entries) == len(ids) and entries[0] is None
    reference = oracle_logprobs(gpt2_oracle, ids)
    for position in range(1, len(ids)):
        row, token = reference[position - 1], ids[position]
        entry = entries[position]
        best = row.topk(k)
        assert set(entry) == {str(token)} | {str(int(i)) for i in best.indices}
        own = entry[str(token)]
        assert own["logprob"] == pytest.approx(float(row[token]), abs=1e-4)
        assert own["decoded_token"] == name(token)
        # Its rank counts the tokens at least as likely; near-ties within the tolerance may go either way.
        lowest, highest = int((row > row[token] + 1e-4).sum()) + 1, int((row >= row[token] - 1e-4).sum())
        assert lowest <= own["rank"] <= highest
        for rank, (value, index) in enumerate(zip(best.values, best.indices), start=1):
            alternative = entry[str(int(index))]
            assert alternative["logprob"] == pytest.approx(float(value), abs=1e-4)
            assert alternative["decoded_token"] == name(int(index))
            if int(index) != token:
                assert alternative["rank"] == rank


def test_prompt_logprobs_equal_transformers_for_every_prompt_and_choice(server, gpt2_tokenizer, gpt2_oracle):
    """vLLM's prompt_logprobs field, beside echo's legacy logprobs: each trimmed to its own k."""
    prompts = [gpt2_tokenizer.encode(p) for p in PROMPTS[:2]]
    body = {"model": "tiny", "prompt": prompts, "max_tokens": 2, "n": 2, "temperature": 0, "prompt_logprobs": 3,
            "echo": True, "logprobs": 1}
    result = httpx.post(f"{server.v1}/completions", json=body, timeout=60).json()
    for index, choice in enumerate(result["choices"]):
        ids = prompts[index // 2]
        assert_prompt_logprobs_equal_oracle(choice["prompt_logprobs"], ids, 3, gpt2_oracle,
                                            lambda t: token_text(gpt2_tokenizer, t))
        echoed = choice["logprobs"]["top_logprobs"][: len(ids)]
        assert echoed[0] is None and all(1 <= len(top) <= 2 for top in echoed[1:])  # echo's k is logprobs=1


def test_prompt_logprobs_are_left_out_unless_asked_and_refused_on_a_stream(server, gpt2_tokenizer):
    plain = httpx.post(f"{server.v1}/completions", json={"model": "tiny", "prompt": "Hi", "max_tokens": 1},
                       timeout=60).json()
    assert "prompt_logprobs" not in plain["choices"][0]
    ids = gpt2_tokenizer.encode(PROMPTS[3])
    zero = httpx.post(f"{server.v1}/completions", json={
        "model": "tiny", "prompt": ids, "max_tokens": 0, "prompt_logprobs": 0, "return_tokens_as_token_ids": True},
        timeout=60).json()["choices"][0]["prompt_logprobs"]
    assert [None if e is None else list(e) for e in zero] == [None] + [[str(t)] for t in ids[1:]]
    assert all(e[str(t)]["decoded_token"] == f"token_id:{t}" for e, t in zip(zero[1:], ids[1:]))
    streamed = httpx.post(f"{server.v1}/completions", json={"model": "tiny", "prompt": "Hi", "stream": True,
                                                            "prompt_logprobs": 1}, timeout=60)
    assert streamed.status_code == 400
    assert streamed.json()["error"]["param"] == "prompt_logprobs"


def test_chat_prompt_logprobs_score_the_rendered_prompt(server, client, gpt2_tokenizer, gpt2_oracle):
    from server.chat import ChatMessage, TemplateChatFormat

    ids = TemplateChatFormat(gpt2_tokenizer).render([ChatMessage("user", "Hello there!")])
    result = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hello there!"}],
                                            max_tokens=1, extra_body={"prompt_logprobs": 2})
    assert result.usage.prompt_tokens == len(ids)
    assert_prompt_logprobs_equal_oracle(result.model_extra["prompt_logprobs"], ids, 2, gpt2_oracle,
                                        lambda t: token_text(gpt2_tokenizer, t))
    plain = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=1)
    assert "prompt_logprobs" not in plain.model_extra


def test_a_priority_reaches_the_priority_scheduler(client):
    """Served with --scheduling-policy priority, any priority is admitted (tests/test_engine.py: in its order)."""
    kwargs = {"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 4, "temperature": 0}
    plain = client.completions.create(**kwargs).choices[0].text
    for priority in (-(2**63), 7):
        assert client.completions.create(**kwargs, extra_body={"priority": priority}).choices[0].text == plain


def test_bad_words_ban_each_word_as_written_and_after_a_space(server, client, gpt2_tokenizer, gpt2_oracle,
                                                              tiny_gpt2_dir):
    """vLLM's bad_words, tokenized for the reference by transformers' tokenizer under vLLM's rule (the word as
    written, and after a space when that is another token sequence of the same length): the greedy continuation
    never ends with a banned form and is otherwise the oracle's greedy choice."""
    from transformers import GPT2TokenizerFast

    hf = GPT2TokenizerFast.from_pretrained(tiny_gpt2_dir)
    prompt = gpt2_tokenizer.encode(PROMPTS[0])
    plain = oracle_greedy(gpt2_oracle, prompt, 6)
    # A generated word that is one token both bare and after a space, so both forms are banned.
    word = next(text.strip() for text in map(hf.decode, [[t] for t in plain])
                if text.startswith(" ") and len(hf.encode(text.strip())) == 1)
    banned = [hf.encode(word), hf.encode(" " + word)]
    expected: list[int] = []
    for _ in range(6):
        row = oracle_logprobs(gpt2_oracle, prompt + expected)[-1].clone()
        row[[ids[0] for ids in banned]] = float("-inf")
        expected.append(int(row.argmax()))
    result = client.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0,
                                       extra_body={"bad_words": ["  " + word], "ignore_eos": True})
    assert result.choices[0].text == gpt2_tokenizer.decode(expected) != gpt2_tokenizer.decode(plain)
    refused = httpx.post(f"{server.v1}/completions", json={"model": "tiny", "prompt": "x", "bad_words": [" "]})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "bad_words"
