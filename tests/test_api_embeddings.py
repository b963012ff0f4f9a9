"""POST /v1/embeddings through the OpenAI SDK and plain HTTP, against transformers' final hidden states.

An input's embedding is the last token's final (normed) hidden state, scaled to unit length, as vLLM serves
a generative model as an embedding model: transformers' ``last_hidden_state[-1]`` over its L2 norm.
"""

from __future__ import annotations

import base64
import struct
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch

from tests.gpt_oss_oracle import transformers_gpt_oss
from tests.server_process import ServerProcess

TEXT = "It was the best of times, it was the worst of times"


@pytest.fixture(scope="module")
def tiny_gpt_oss_dir(tmp_path_factory):
    from models.testing.gpt_oss_checkpoint import write_tiny_gpt_oss

    return write_tiny_gpt_oss(tmp_path_factory.mktemp("tiny") / "gpt-oss")


@pytest.fixture(scope="module")
def server(tiny_gpt2_dir, tiny_gpt_oss_dir):
    args = ["--model", f"tiny={tiny_gpt2_dir}", "--model", f"oss={tiny_gpt_oss_dir}"]
    with ServerProcess(args, startup_timeout=300) as running:  # two models, on a busy CI machine too
        yield running


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def gpt_oss_oracle(tiny_gpt_oss_dir):
    return transformers_gpt_oss(tiny_gpt_oss_dir)


@torch.no_grad()
def oracle_embedding(transformer, ids: list[int]) -> list[float]:
    """The base model's final hidden state at the last token, over its L2 norm (float64)."""
    state = transformer(torch.tensor([ids])).last_hidden_state[0, -1].double()
    return (state / state.norm()).tolist()


def embed(server, **body) -> httpx.Response:
    return httpx.post(server.v1 + "/embeddings", json={"model": "tiny", **body}, timeout=60)


def test_the_sdk_gets_transformers_last_hidden_state_at_unit_length(client, gpt2_tokenizer, gpt2_oracle):
    """The SDK asks for base64 by default and decodes it as float32; asked for floats, the same vector."""
    expected = oracle_embedding(gpt2_oracle.transformer, gpt2_tokenizer.encode(TEXT))
    by_default = client.embeddings.create(model="tiny", input=TEXT)
    as_floats = client.embeddings.create(model="tiny", input=TEXT, encoding_format="float")
    for reply in (by_default, as_floats):
        assert reply.model == "tiny" and reply.object == "list" and len(reply.data) == 1
        assert reply.data[0].object == "embedding" and reply.data[0].index == 0
        assert reply.data[0].embedding == pytest.approx(expected, abs=1e-4)
        assert sum(v * v for v in reply.data[0].embedding) == pytest.approx(1.0, abs=1e-5)
        assert reply.usage.prompt_tokens == reply.usage.total_tokens == len(gpt2_tokenizer.encode(TEXT))
    assert by_default.data[0].embedding == pytest.approx(as_floats.data[0].embedding, abs=1e-6)


def test_base64_is_the_float_vector_as_little_endian_float32(server):
    floats = embed(server, input=TEXT).json()["data"][0]["embedding"]
    packed = embed(server, input=TEXT, encoding_format="base64").json()["data"][0]["embedding"]
    raw = base64.b64decode(packed)
    assert len(raw) == 4 * len(floats)
    assert list(struct.unpack(f"<{len(floats)}f", raw)) == pytest.approx(floats, abs=1e-7)


def test_a_batch_of_texts_and_of_token_ids_equals_each_input_alone(server, gpt2_tokenizer, gpt2_oracle):
    texts = [TEXT, "A short one.", "x", TEXT + " and more"]
    by_text = embed(server, input=texts).json()
    by_ids = embed(server, input=[gpt2_tokenizer.encode(t) for t in texts]).json()
    assert [d["index"] for d in by_text["data"]] == [0, 1, 2, 3]
    assert by_text["usage"]["prompt_tokens"] == sum(len(gpt2_tokenizer.encode(t)) for t in texts)
    for text, a, b in zip(texts, by_text["data"], by_ids["data"]):
        ids = gpt2_tokenizer.encode(text)
        assert a["embedding"] == pytest.approx(oracle_embedding(gpt2_oracle.transformer, ids), abs=1e-4)
        assert b["embedding"] == pytest.approx(a["embedding"], abs=1e-5)
        alone = embed(server, input=ids).json()["data"][0]["embedding"]
        assert alone == pytest.approx(a["embedding"], abs=1e-5)


def test_gpt_oss_embeddings_match_transformers(client, tiny_gpt_oss_dir, gpt_oss_oracle):
    from models.tokenizer import load_tokenizer

    ids = load_tokenizer(tiny_gpt_oss_dir).encode(TEXT)
    by_text = client.embeddings.create(model="oss", input=TEXT, encoding_format="float")
    by_ids = client.embeddings.create(model="oss", input=[ids, ids[:5]], encoding_format="float")
    assert by_text.data[0].embedding == pytest.approx(oracle_embedding(gpt_oss_oracle.model, ids), abs=1e-4)
    assert by_ids.data[0].embedding == pytest.approx(by_text.data[0].embedding, abs=1e-5)
    assert by_ids.data[1].embedding == pytest.approx(oracle_embedding(gpt_oss_oracle.model, ids[:5]), abs=1e-4)


CONVERSATION = [{"role": "user", "content": "What is a fox?"}, {"role": "assistant", "content": "An animal."}]


def chat_ids(server, model: str, **fields) -> list[int]:
    """The conversation's prompt as /tokenize renders it (test_chat_harmony holds that to openai-harmony's)."""
    reply = httpx.post(server.base_url + "/tokenize", json={"model": model, "messages": CONVERSATION, **fields},
                       timeout=30)
    return reply.json()["tokens"]


@pytest.mark.parametrize("model", ["tiny", "oss"])
def test_a_conversation_is_embedded_as_its_chat_prompt_without_the_assistants_opening(server, model):
    """vLLM's chat form: messages rendered as chat renders them, add_generation_prompt false by default."""
    ids = chat_ids(server, model, add_generation_prompt=False)
    assert ids != chat_ids(server, model)  # /tokenize's default opens the assistant's reply
    reply = embed(server, model=model, messages=CONVERSATION).json()
    assert reply["usage"]["prompt_tokens"] == len(ids)
    assert reply["data"][0]["embedding"] == pytest.approx(
        embed(server, model=model, input=ids).json()["data"][0]["embedding"], abs=1e-5)
    opened = embed(server, model=model, messages=CONVERSATION, add_generation_prompt=True).json()
    assert opened["usage"]["prompt_tokens"] == len(chat_ids(server, model))


def test_a_gpt_oss_conversations_embedding_matches_transformers(server, gpt_oss_oracle):
    ids = chat_ids(server, "oss", add_generation_prompt=False)
    reply = embed(server, model="oss", messages=CONVERSATION, truncate_prompt_tokens=8).json()
    assert reply["data"][0]["embedding"] == pytest.approx(oracle_embedding(gpt_oss_oracle.model, ids[-8:]),
                                                          abs=1e-4)


@pytest.mark.parametrize("body,param", [
    ({"messages": CONVERSATION, "input": TEXT}, "input"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "narrator", "content": "Once"}]}, "messages"),
    ({"messages": CONVERSATION, "add_generation_prompt": True, "continue_final_message": True},
     "continue_final_message"),
    ({"messages": CONVERSATION, "dimensions": 3}, "dimensions"),
], ids=["both-forms", "no-messages", "unknown-role", "continue-and-open", "dimensions"])
def test_a_bad_conversation_gets_an_openai_error_naming_the_field(server, body, param):
    response = embed(server, **body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_normalize_false_gives_the_hidden_state_as_it_is(server, gpt2_tokenizer, gpt2_oracle):
    with torch.no_grad():
        state = gpt2_oracle.transformer(torch.tensor([gpt2_tokenizer.encode(TEXT)])).last_hidden_state[0, -1]
    raw = embed(server, input=TEXT, normalize=False).json()["data"][0]["embedding"]
    assert raw == pytest.approx(state.tolist(), abs=1e-4)
    assert sum(v * v for v in raw) == pytest.approx(float(state.double().norm() ** 2), rel=1e-4)


def test_a_repeated_input_is_served_from_the_prefix_cache_with_the_same_vector(server, gpt2_tokenizer):
    long_text = " ".join([TEXT] * 4)  # several full KV blocks to find in the cache
    first = embed(server, input=long_text).json()["data"][0]["embedding"]
    again = embed(server, input=long_text).json()["data"][0]["embedding"]
    assert again == pytest.approx(first, abs=1e-5)


def test_truncate_prompt_tokens_embeds_the_last_k(server, gpt2_tokenizer):
    ids = gpt2_tokenizer.encode(TEXT)
    truncated = embed(server, input=TEXT, truncate_prompt_tokens=4).json()
    assert truncated["usage"]["prompt_tokens"] == 4
    assert truncated["data"][0]["embedding"] == pytest.approx(
        embed(server, input=ids[-4:]).json()["data"][0]["embedding"], abs=1e-5)


def test_dimensions_may_only_name_the_models_own_width(server, client):
    width = len(embed(server, input=TEXT).json()["data"][0]["embedding"])
    assert len(client.embeddings.create(model="tiny", input=TEXT, dimensions=width).data[0].embedding) == width
    with pytest.raises(openai.BadRequestError) as refused:
        client.embeddings.create(model="tiny", input=TEXT, dimensions=width // 2)
    assert refused.value.body["param"] == "dimensions" and "matryoshka" in refused.value.body["message"]


@pytest.mark.parametrize("body,param", [
    ({"input": ""}, "input"),
    ({"input": ["fine", ""]}, "input"),
    ({"input": [50257]}, "input"),
    ({"input": []}, "input"),
    ({"input": TEXT, "encoding_format": "int8"}, "encoding_format"),
    ({"input": TEXT, "dimensions": 0}, "dimensions"),
    ({"input": TEXT, "temperature": 0.5}, "temperature"),
], ids=["empty-string", "empty-in-a-list", "id-outside-the-vocabulary", "no-inputs", "unknown-format",
        "zero-dimensions", "a-sampling-field"])
def test_bad_requests_get_an_openai_error_naming_the_field(server, body, param):
    response = embed(server, **body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]
    assert embed(server, input=TEXT).status_code == 200  # and the server keeps serving


def test_an_input_longer_than_the_context_is_refused_naming_input_unless_truncated(server):
    response = embed(server, input=[[1, 2], [0] * 4096])
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "input" and "input 1 has 4096 tokens" in error["message"]
    assert embed(server, input=[0] * 4096, truncate_prompt_tokens=-1).status_code == 200


def test_an_unknown_model_is_a_404(server):
    response = httpx.post(server.v1 + "/embeddings", json={"model": "nope", "input": TEXT}, timeout=30)
    assert response.status_code == 404 and response.json()["error"]["param"] == "model"


def test_embeddings_beside_generation_leave_its_greedy_answer_alone(server):
    """Embedding requests batch with a completion's prefill and decode; its greedy tokens stay the same."""
    body = {"model": "tiny", "prompt": TEXT, "max_tokens": 12, "temperature": 0}
    alone = httpx.post(server.v1 + "/completions", json=body, timeout=60).json()["choices"][0]["text"]
    with ThreadPoolExecutor(4) as pool:
        completion = pool.submit(httpx.post, server.v1 + "/completions", json=body, timeout=60)
        embeddings = [pool.submit(embed, server, input=[TEXT[: 10 + i], "another input"]) for i in range(6)]
        assert completion.result().json()["choices"][0]["text"] == alone
        assert all(e.result().status_code == 200 for e in embeddings)
