"""vLLM's use_beam_search, held to transformers' beam search: the same n beams, best first, with the same scores.

transformers' `generate(num_beams=n, num_return_sequences=n, length_penalty=p)` is the oracle (its default early
stopping), on the tiny GPT-2's weights, through a real server. Stop tokens are chosen among the model's likeliest
next tokens so that beams end early and the ended-beam bookkeeping and early stop are exercised, not only the
run to max_tokens.
"""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest
import torch

from tests.server_process import ServerProcess

PROMPT = [464, 3290, 373, 257, 1295, 286]
WIDTH = 4
MAX_TOKENS = 8
EOS = 50256


@pytest.fixture(scope="module")
def server(tiny_gpt2_dir):
    with ServerProcess(["--model", f"tiny={tiny_gpt2_dir}"]) as running:
        yield running


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.v1, timeout=120) as client:
        yield client


def likeliest_next(oracle, prompt: list[int], rank: int) -> int:
    with torch.no_grad():
        logits = oracle(torch.tensor([prompt])).logits[0, -1]
    return int(torch.topk(logits, rank + 1).indices[rank])


def oracle_beams(oracle, prompt: list[int], length_penalty: float, stop: int | None) -> list[tuple[list[int], float]]:
    """transformers' n beams: each one's tokens (its stop token last, padding dropped) and its score."""
    with torch.no_grad():
        out = oracle.generate(torch.tensor([prompt]), num_beams=WIDTH, num_return_sequences=WIDTH,
                              max_new_tokens=MAX_TOKENS, do_sample=False, length_penalty=length_penalty,
                              early_stopping=False, eos_token_id=stop if stop is not None else EOS,
                              pad_token_id=EOS, output_scores=True, return_dict_in_generate=True)
    beams = []
    for sequence, score in zip(out.sequences.tolist(), out.sequences_scores.tolist()):
        tokens = sequence[len(prompt):]
        end = stop if stop is not None else EOS
        if end in tokens:
            tokens = tokens[: tokens.index(end) + 1]
        beams.append((tokens, score))
    return beams


def served_beams(http: httpx.Client, body: dict, length_penalty: float) -> list[tuple[list[int], float, str]]:
    response = http.post("/completions", json={"model": "tiny", "prompt": PROMPT, "max_tokens": MAX_TOKENS,
                                               "n": WIDTH, "use_beam_search": True, "logprobs": 1,
                                               "length_penalty": length_penalty, "return_token_ids": True} | body)
    assert response.status_code == 200, response.text
    choices = response.json()["choices"]
    assert [choice["index"] for choice in choices] == list(range(WIDTH))
    beams = []
    for choice in choices:
        tokens = choice["token_ids"]
        logprob = sum(choice["logprobs"]["token_logprobs"])
        beams.append((tokens, logprob / len(tokens) ** length_penalty, choice["finish_reason"]))
    return beams


@pytest.mark.parametrize("length_penalty", [1.0, 0.0, 2.0, -0.5])
@pytest.mark.parametrize("stop_rank", [None, 0, 1, 3])
def test_the_beams_are_transformers_beams(http, gpt2_oracle, length_penalty, stop_rank):
    stop = None if stop_rank is None else likeliest_next(gpt2_oracle, PROMPT, stop_rank)
    expected = oracle_beams(gpt2_oracle, PROMPT, length_penalty, stop)
    got = served_beams(http, {} if stop is None else {"stop_token_ids": [stop]}, length_penalty)
    assert [tokens for tokens, _, _ in got] == [tokens for tokens, _ in expected]
    assert [score for _, score, _ in got] == pytest.approx([score for _, score in expected], abs=1e-4)
    for tokens, _, finish_reason in got:
        assert finish_reason == ("stop" if stop is not None and tokens[-1] == stop else "length")
    if stop_rank == 0 and length_penalty <= 1.0:  # the likeliest first token ends a beam that scores well
        assert any(len(tokens) < MAX_TOKENS for tokens, _, _ in got), "a beam ended on the stop token"


def test_every_prompt_gets_its_own_beams_and_text_follows_the_tokens(http, gpt2_tokenizer):
    prompts = [PROMPT, PROMPT[:3]]
    response = http.post("/completions", json={"model": "tiny", "prompt": prompts, "max_tokens": 5, "n": 3,
                                               "use_beam_search": True, "return_token_ids": True, "echo": True})
    assert response.status_code == 200, response.text
    choices = response.json()["choices"]
    assert len(choices) == 6
    for choice in choices:
        prompt = prompts[choice["index"] // 3]
        assert choice["text"] == gpt2_tokenizer.decode(prompt + choice["token_ids"])
    assert response.json()["usage"]["completion_tokens"] == sum(len(c["token_ids"]) for c in choices)


def test_streamed_beams_are_the_same_beams(http):
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 6, "n": 3, "use_beam_search": True,
            "return_token_ids": True}
    whole = http.post("/completions", json=body).json()["choices"]
    streamed: dict[int, list[int]] = {}
    with http.stream("POST", "/completions", json=body | {"stream": True}) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                for choice in json.loads(line[6:])["choices"]:
                    streamed.setdefault(choice["index"], []).extend(choice["token_ids"])
    assert [streamed[i] for i in range(3)] == [choice["token_ids"] for choice in whole]


def test_chat_takes_beam_search_too(server, http):
    client = openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0)
    result = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], n=3,
                                            max_tokens=6, extra_body={"use_beam_search": True,
                                                                      "return_token_ids": True})
    beams = [choice.model_extra["token_ids"] for choice in result.choices]
    assert len(beams) == 3 and len({tuple(beam) for beam in beams}) == 3  # three different beams


@pytest.mark.parametrize(("field", "value"), [("n", 11), ("stop", ["x"]), ("min_tokens", 1), ("logit_bias", {"5": 1}),
                                              ("allowed_token_ids", [5]), ("bad_words", ["x"]),
                                              ("presence_penalty", 0.5), ("repetition_penalty", 1.2),
                                              ("structured_outputs", {"regex": "a+"}),
                                              ("response_format", {"type": "json_object"})])
def test_what_beam_search_cannot_honour_is_a_400_naming_it(http, field, value):
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 2, "use_beam_search": True, field: value}
    response = http.post("/completions", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == field
    assert http.post("/completions", json=body | {"use_beam_search": False}).status_code == 200


def test_nothing_is_left_in_the_engine(server, http):
    http.post("/completions", json={"model": "tiny", "prompt": PROMPT, "max_tokens": 8, "n": 4,
                                    "use_beam_search": True})
    stats = server.health()["models"]["tiny"]
    assert (stats["running"], stats["waiting"], stats["kv_blocks_used"]) == (0, 0, 0)


def oracle_steps(oracle, prompt: list[int], settings, max_tokens: int) -> list[tuple[list[int], float]]:
    """Our search (server.routes.beam_search.BeamSearch) fed transformers' log-probabilities step by step."""
    from server.engine.outputs import TokenLogprob
    from server.routes.beam_search import BeamSearch

    search = BeamSearch(settings, max_tokens)
    going = bool(search.running)
    while going:
        with torch.no_grad():
            rows = [oracle(torch.tensor([prompt + beam.tokens])).logits[0, -1].log_softmax(-1)
                    for beam in search.running]
        tops = []
        for row in rows:
            values, ids = torch.topk(row, 2 * settings.width)
            tops.append(TokenLogprob(int(ids[0]), float(values[0]), list(zip(ids.tolist(), values.tolist()))))
        going = search.advance(tops)
    return [(beam.tokens, score) for score, beam in search.ended]


@pytest.mark.parametrize("case", range(24))
def test_the_search_is_transformers_search_over_many_prompts(gpt2_oracle, case):
    """Random prompts, widths, lengths, penalties and stop tokens among the likeliest: the ranking, the ended
    beams' bookkeeping and the early stop all show up in some of them."""
    from server.routes.beam_search import BeamSettings

    generator = torch.Generator().manual_seed(case)
    prompt = torch.randint(0, EOS, (int(torch.randint(1, 12, (1,), generator=generator)),), generator=generator)
    prompt_ids = prompt.tolist()
    width = int(torch.randint(2, 6, (1,), generator=generator))
    max_tokens = int(torch.randint(2, 12, (1,), generator=generator))
    length_penalty = [1.0, 0.0, 2.0, -1.0, 0.5][case % 5]
    stop = likeliest_next(gpt2_oracle, prompt_ids, case % 7)
    with torch.no_grad():
        out = gpt2_oracle.generate(prompt[None], num_beams=width, num_return_sequences=width,
                                   max_new_tokens=max_tokens, do_sample=False, length_penalty=length_penalty,
                                   early_stopping=False, eos_token_id=stop, pad_token_id=EOS,
                                   output_scores=True, return_dict_in_generate=True)
    expected = []
    for sequence, score in zip(out.sequences.tolist(), out.sequences_scores.tolist()):
        tokens = sequence[len(prompt_ids):]
        expected.append((tokens[: tokens.index(stop) + 1] if stop in tokens else tokens, score))
    got = oracle_steps(gpt2_oracle, prompt_ids, BeamSettings(width, length_penalty, frozenset({stop}), None),
                       max_tokens)
    assert [tokens for tokens, _ in got] == [tokens for tokens, _ in expected]
    assert [score for _, score in got] == pytest.approx([score for _, score in expected], rel=1e-6, abs=1e-4)


def generated_tokens(server) -> float:
    metrics = httpx.get(server.base_url + "/metrics", timeout=10).text
    return sum(float(line.split()[-1]) for line in metrics.splitlines()
               if line.startswith("gptserve:generation_tokens_total{"))


def test_a_client_that_leaves_mid_search_stops_it_and_leaves_nothing_behind(server, http):
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 120, "n": 10, "use_beam_search": True,
            "ignore_eos": True}
    before = generated_tokens(server)
    started = time.monotonic()
    assert http.post("/completions", json=body).status_code == 200
    whole, whole_tokens = time.monotonic() - started, generated_tokens(server) - before
    before = generated_tokens(server)
    with pytest.raises(httpx.ReadTimeout):  # gone a quarter of the way through
        httpx.post(server.v1 + "/completions", json=body, timeout=whole / 4)
    time.sleep(whole)  # time enough for a search that ran on to finish
    deadline = time.monotonic() + 30
    while (stats := server.health()["models"]["tiny"])["running"] + stats["waiting"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert (stats["running"], stats["waiting"], stats["kv_blocks_used"]) == (0, 0, 0)
    assert generated_tokens(server) - before < 0.75 * whole_tokens, "the search stopped with its client"
    assert http.post("/completions", json=body | {"max_tokens": 2}).status_code == 200


def test_there_are_always_n_choices():
    """A search that ends no beam still answers n choices (max_tokens 0 here; served, n > 1 needs max_tokens)."""
    from server.routes.beam_search import BeamSearch, BeamSettings

    outputs = BeamSearch(BeamSettings(3, 1.0, frozenset(), None), max_tokens=0).outputs()
    assert [(output.index, output.new_token_ids, output.finish_reason) for output in outputs] == [
        (i, [], "length") for i in range(3)]
