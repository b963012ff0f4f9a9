"""POST /v1/perplexity against an oracle that implements CONTRACT.md's definition from transformers' logits."""

from __future__ import annotations

import math

import httpx
import pytest
import torch

from tests.server_process import ServerProcess

EOS = 50256
TEXT = "It was the best of times, it was the worst of times, it was the age of wisdom"


@pytest.fixture(scope="module")
def server(tiny_gpt2_dir):
    with ServerProcess(["--model", f"tiny={tiny_gpt2_dir}"]) as running:
        yield running


@torch.no_grad()
def oracle_token_logprobs(gpt2_oracle, ids: list[int], max_length: int, stride: int) -> list[float | None]:
    """HF's strided sliding window: windows at 0, S, 2S...; each scores what no earlier window scored."""
    scores: list[float | None] = [None] * len(ids)
    for start in range(0, len(ids), stride):
        end = min(start + max_length, len(ids))
        window = ids[start:end]
        logprobs = torch.log_softmax(gpt2_oracle(torch.tensor([window])).logits[0].double(), -1)
        for position in range(start + 1, end):
            if scores[position] is None:
                scores[position] = float(logprobs[position - start - 1, ids[position]])
        if end == len(ids):
            break
    return scores


def score(server, **body) -> dict:
    response = httpx.post(server.v1 + "/perplexity", json={"model": "tiny", **body}, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def check(result: dict, expected: list[float | None]) -> None:
    scored = [s for s in expected if s is not None]
    nll = -sum(scored) / len(scored)
    assert result["object"] == "perplexity"
    assert result["num_tokens"] == len(scored)
    assert result["nll"] == pytest.approx(nll, abs=1e-4)
    assert result["perplexity"] == pytest.approx(math.exp(nll), rel=1e-4)
    if "token_logprobs" in result and result["token_logprobs"] is not None:
        assert [s is None for s in result["token_logprobs"]] == [s is None for s in expected]
        assert [s for s in result["token_logprobs"] if s is not None] == pytest.approx(scored, abs=1e-4)


def test_short_text_scores_every_token_after_the_first(server, gpt2_tokenizer, gpt2_oracle):
    ids = gpt2_tokenizer.encode(TEXT)
    body = score(server, input=TEXT, logprobs=True)
    assert body["object"] == "list" and body["model"] == "tiny"
    assert body["usage"]["prompt_tokens"] == len(ids)
    check(body["data"][0], oracle_token_logprobs(gpt2_oracle, ids, 128, 64))
    assert body["data"][0]["token_logprobs"][0] is None


def test_batch_of_texts_and_token_ids(server, gpt2_tokenizer, gpt2_oracle):
    texts = [TEXT, "A short one.", TEXT[::-1]]
    by_text = score(server, input=texts)["data"]
    by_ids = score(server, input=[gpt2_tokenizer.encode(t) for t in texts])["data"]
    assert [r["index"] for r in by_text] == [0, 1, 2]
    for text, a, b in zip(texts, by_text, by_ids):
        ids = gpt2_tokenizer.encode(text)
        check(a, oracle_token_logprobs(gpt2_oracle, ids, 128, 64))
        assert a["token_logprobs"] is None
        assert b["nll"] == pytest.approx(a["nll"], abs=1e-6)
    single = score(server, input=gpt2_tokenizer.encode(texts[1]))["data"]
    assert len(single) == 1 and single[0]["nll"] == pytest.approx(by_text[1]["nll"], abs=1e-6)


def test_prepend_bos_scores_the_first_token_too(server, gpt2_tokenizer, gpt2_oracle):
    ids = gpt2_tokenizer.encode(TEXT)
    result = score(server, input=TEXT, prepend_bos=True, logprobs=True)["data"][0]
    expected = oracle_token_logprobs(gpt2_oracle, [EOS, *ids], 128, 64)[1:]
    assert result["num_tokens"] == len(ids)
    check(result, expected)


@pytest.mark.parametrize(("max_length", "stride"), [(16, 8), (16, 5), (10, 9), (2, 1), (32, None)])
def test_long_input_uses_strided_windows_that_score_every_token_once(server, gpt2_tokenizer, gpt2_oracle, max_length,
                                                                     stride):
    text = " ".join([TEXT] * 8)  # longer than the model's 128-token context
    ids = gpt2_tokenizer.encode(text)
    assert len(ids) > 128
    body = {"input": text, "max_length": max_length, "logprobs": True}
    if stride is not None:
        body["stride"] = stride
    expected = oracle_token_logprobs(gpt2_oracle, ids, max_length, stride or max_length // 2)
    result = score(server, **body)["data"][0]
    check(result, expected)
    assert result["num_tokens"] == len(ids) - 1


def test_default_window_is_the_model_context(server, gpt2_tokenizer, gpt2_oracle):
    text = " ".join([TEXT] * 8)
    ids = gpt2_tokenizer.encode(text)
    check(score(server, input=text, logprobs=True)["data"][0], oracle_token_logprobs(gpt2_oracle, ids, 128, 64))


def test_repeated_request_gives_the_same_answer(server):
    """Prefix-cached windows must still be scored."""
    first = score(server, input=TEXT, logprobs=True)["data"][0]
    assert score(server, input=TEXT, logprobs=True)["data"][0] == first


def test_input_with_nothing_to_score_has_zero_tokens_and_null_perplexity(server, gpt2_tokenizer, gpt2_oracle):
    """An empty input, or one token without prepend_bos, has no x_i with i >= 1: the mean over none is undefined."""
    one = gpt2_tokenizer.encode("x")
    assert len(one) == 1
    data = score(server, input=["", "x", TEXT], logprobs=True)["data"]
    empty = {"object": "perplexity", "perplexity": None, "nll": None, "num_tokens": 0}
    assert data[0] == {**empty, "index": 0, "token_logprobs": []}
    assert data[1] == {**empty, "index": 1, "token_logprobs": [None]}
    check(data[2], oracle_token_logprobs(gpt2_oracle, gpt2_tokenizer.encode(TEXT), 128, 64))
    assert score(server, input=one)["data"][0] == {**empty, "index": 0, "token_logprobs": None}
    assert score(server, input="", prepend_bos=True)["data"][0]["num_tokens"] == 0
    with_bos = score(server, input="x", prepend_bos=True, logprobs=True)["data"][0]
    check(with_bos, oracle_token_logprobs(gpt2_oracle, [EOS, *one], 128, 64)[1:])


@pytest.mark.parametrize(("body", "param"), [
    ({"input": TEXT, "max_length": 16, "stride": 17}, "stride"),
    ({"input": TEXT, "max_length": 16, "stride": 16}, "stride"),
    ({"input": TEXT, "max_length": 4096}, "max_length"), ({"input": TEXT, "max_length": 1}, "max_length")])
def test_unscorable_requests_are_400(server, body, param):
    """stride == max_length would leave each later window's first token without context, so unscored."""
    response = httpx.post(server.v1 + "/perplexity", json={"model": "tiny", **body}, timeout=60)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == param
