"""vLLM's /score and /rerank against transformers: a pair's score is the cosine similarity of the two texts'
last-token final hidden states (what vLLM computes with an embedding model)."""

from __future__ import annotations

import httpx
import pytest
import torch

from tests.server_process import ServerProcess

QUERY = "Where do foxes live?"
DOCUMENTS = ["Foxes live in forests and dens.", "The stock market fell today.", "Where do foxes live?",
             "A red fox was seen near the river."]


@pytest.fixture(scope="module")
def server(tiny_gpt2_dir):
    with ServerProcess(["--model", f"tiny={tiny_gpt2_dir}", "--max-model-len", "64"]) as running:
        yield running


@pytest.fixture(scope="module")
def oracle(gpt2_oracle, gpt2_tokenizer):
    @torch.no_grad()
    def cosine(first: str | list[int], second: str | list[int]) -> float:
        states = []
        for text in (first, second):
            ids = gpt2_tokenizer.encode(text) if isinstance(text, str) else text
            state = gpt2_oracle.transformer(torch.tensor([ids])).last_hidden_state[0, -1].double()
            states.append(state / state.norm())
        return float(states[0] @ states[1])

    return cosine


def post(server, path: str, **body) -> httpx.Response:
    return httpx.post(server.base_url + path, json={"model": "tiny", **body}, timeout=60)


def test_score_pairs_one_text_with_each_of_the_others_as_transformers_does(server, oracle, gpt2_tokenizer):
    reply = post(server, "/v1/score", text_1=QUERY, text_2=DOCUMENTS)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["object"] == "list" and body["model"] == "tiny" and body["id"].startswith("score-")
    assert [item["index"] for item in body["data"]] == list(range(len(DOCUMENTS)))
    assert all(item["object"] == "score" for item in body["data"])
    assert [item["score"] for item in body["data"]] == pytest.approx([oracle(QUERY, d) for d in DOCUMENTS], abs=1e-4)
    assert body["data"][2]["score"] == pytest.approx(1.0, abs=1e-6)  # the query itself
    tokens = sum(len(gpt2_tokenizer.encode(text)) for text in [QUERY, *DOCUMENTS])  # the query embedded once
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
    assert post(server, "/score", text_1=QUERY, text_2=DOCUMENTS).json()["data"] == body["data"]


def test_score_pairs_two_lists_item_by_item(server, oracle):
    firsts, seconds = DOCUMENTS[:2], DOCUMENTS[2:]
    reply = post(server, "/v1/score", text_1=firsts, text_2=seconds)
    assert reply.status_code == 200, reply.text
    scores = [item["score"] for item in reply.json()["data"]]
    assert scores == pytest.approx([oracle(a, b) for a, b in zip(firsts, seconds)], abs=1e-4)


def test_score_refuses_lists_that_do_not_pair(server):
    reply = post(server, "/v1/score", text_1=DOCUMENTS[:2], text_2=DOCUMENTS[:3])
    assert reply.status_code == 400
    assert reply.json()["error"]["param"] == "text_1" and "as many as text_2 (3)" in reply.json()["error"]["message"]


@pytest.mark.parametrize("path", ["/v1/rerank", "/rerank", "/v2/rerank"])
def test_rerank_orders_the_documents_by_their_score_with_the_query(server, oracle, path):
    reply = post(server, path, query=QUERY, documents=DOCUMENTS)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    expected = sorted(range(len(DOCUMENTS)), key=lambda i: -oracle(QUERY, DOCUMENTS[i]))
    assert [result["index"] for result in body["results"]] == expected
    for result in body["results"]:
        assert result["document"] == {"text": DOCUMENTS[result["index"]]}
        assert result["relevance_score"] == pytest.approx(oracle(QUERY, DOCUMENTS[result["index"]]), abs=1e-4)
    assert body["model"] == "tiny" and body["id"].startswith("rerank-") and body["usage"]["total_tokens"] > 0


def test_rerank_top_n_keeps_the_most_relevant_and_return_documents_false_leaves_the_text_out(server):
    everything = post(server, "/v1/rerank", query=QUERY, documents=DOCUMENTS).json()["results"]
    top_two = post(server, "/v1/rerank", query=QUERY, documents=DOCUMENTS, top_n=2,
                   return_documents=False).json()["results"]
    assert [r["index"] for r in top_two] == [r["index"] for r in everything[:2]]
    assert all(r["document"] is None for r in top_two)
    assert len(post(server, "/v1/rerank", query=QUERY, documents=DOCUMENTS, top_n=2**62).json()["results"]) == 4


def test_a_text_longer_than_the_context_is_refused_naming_its_field_unless_truncated(server, oracle, gpt2_tokenizer):
    long_text = "fox " * 100  # over the 64-token context
    refused = post(server, "/v1/rerank", query=QUERY, documents=[DOCUMENTS[0], long_text])
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "documents"
    assert "documents 1 has" in refused.json()["error"]["message"]
    refused = post(server, "/v1/score", text_1=long_text, text_2=DOCUMENTS[0])
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "text_1"
    kept = post(server, "/v1/score", text_1=long_text, text_2=DOCUMENTS[0], truncate_prompt_tokens=8)
    assert kept.status_code == 200, kept.text
    assert kept.json()["data"][0]["score"] == pytest.approx(
        oracle(gpt2_tokenizer.encode(long_text)[-8:], DOCUMENTS[0]), abs=1e-4)


@pytest.mark.parametrize("body", [{"query": "", "documents": ["a"]}, {"query": "a", "documents": []},
                                  {"query": "a", "documents": ["a"], "top_n": -1},
                                  {"query": "a", "documents": ["a"], "rank_fields": ["text"]},
                                  {"text_1": "a"}])
def test_schema_invalid_bodies_get_400_and_the_server_keeps_serving(server, body):
    path = "/v1/score" if "text_1" in body else "/v1/rerank"
    reply = post(server, path, **body)
    assert reply.status_code == 400 and reply.json()["error"]["type"] == "invalid_request_error", reply.text
    assert server.health()["models"]["tiny"]["kv_blocks_used"] == 0
