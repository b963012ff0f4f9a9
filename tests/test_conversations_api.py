"""OpenAI's Conversations API through the OpenAI SDK, and Responses requests that name a conversation.

As in test_responses_api, a scripted engine stands in for GPT-OSS so that its output holds a function call for
certain; openai-harmony renders the prompt the second turn must see.
"""

from __future__ import annotations

import openai
import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.config import ServerConfig
from server.generation_defaults import GenerationDefaults
from server.routes.conversation_store import ConversationStore
from server.routes.models import ServedModel
from tests.test_chat_harmony import chat, harmony, tokenizer  # noqa: F401 - fixtures
from tests.test_responses_api import WEATHER, engine, scripts  # noqa: F401 - fixtures
from tests.test_tool_calls_api import ARGUMENTS, prompt_after_weather_call


@pytest.fixture
def client(chat, engine, scripts) -> openai.OpenAI:
    engine.script = scripts["answer"]
    app = create_app(ServerConfig(), {})
    with TestClient(app) as http:
        app.state.models["oss"] = ServedModel("oss", engine, chat, 0, {}, GenerationDefaults(chat.stop_token_ids))
        yield openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http, max_retries=0)


def test_a_conversation_is_created_read_updated_and_deleted(client):
    created = client.conversations.create(items=[{"type": "message", "role": "user", "content": "Hi"}],
                                          metadata={"topic": "greeting"})
    assert created.id.startswith("conv_") and created.object == "conversation"
    assert client.conversations.retrieve(created.id) == created
    updated = client.conversations.update(created.id, metadata={"topic": "weather"})
    assert updated.metadata == {"topic": "weather"} and updated.created_at == created.created_at
    [item] = client.conversations.items.list(created.id).data
    assert (item.type, item.role, item.content[0].type, item.content[0].text) == ("message", "user", "input_text",
                                                                                 "Hi")
    deleted = client.conversations.delete(created.id)
    assert (deleted.id, deleted.deleted, deleted.object) == (created.id, True, "conversation.deleted")
    with pytest.raises(openai.NotFoundError) as missing:
        client.conversations.retrieve(created.id)
    assert missing.value.body["param"] == "conversation_id" and created.id in missing.value.body["message"]


def test_a_conversation_created_without_a_body_is_empty(client):
    created = client._client.post("http://testserver/v1/conversations")  # the TestClient, as curl -X POST sends it
    assert created.status_code == 200 and created.json()["metadata"] == {}
    assert client.conversations.items.list(created.json()["id"]).data == []


def test_items_are_added_listed_in_pages_read_and_deleted(client):
    conversation = client.conversations.create()
    added = client.conversations.items.create(conversation.id, items=[
        {"type": "message", "role": "user", "content": f"message {i}"} for i in range(5)])
    ids = [item.id for item in added.data]
    assert len(set(ids)) == 5 and not added.has_more
    newest_first = client.conversations.items.list(conversation.id, limit=2)
    assert [item.id for item in newest_first.data] == ids[:2:-1][:2] and newest_first.has_more
    rest = client.conversations.items.list(conversation.id, after=newest_first.last_id, limit=10)
    assert [item.id for item in rest.data] == ids[2::-1] and not rest.has_more
    assert [item.id for item in client.conversations.items.list(conversation.id, order="asc")] == ids
    assert client.conversations.items.retrieve(ids[1], conversation_id=conversation.id).content[0].text == "message 1"
    assert client.conversations.items.delete(ids[1], conversation_id=conversation.id).id == conversation.id
    assert [item.id for item in client.conversations.items.list(conversation.id, order="asc")] == \
        ids[:1] + ids[2:]
    with pytest.raises(openai.NotFoundError):
        client.conversations.items.retrieve(ids[1], conversation_id=conversation.id)
    with pytest.raises(openai.BadRequestError, match="no item 'msg_none'"):
        client.conversations.items.list(conversation.id, after="msg_none")


def test_responses_start_from_the_conversation_and_add_their_input_and_output(client, engine, harmony, scripts):
    """The function-calling loop of test_responses_api, its state kept by the conversation: the second turn's
    prompt is openai-harmony's for the whole exchange."""
    conversation = client.conversations.create()
    engine.script = scripts["call"]
    first = client.responses.create(model="oss", input="Weather in Oslo?", tools=[WEATHER],
                                    conversation=conversation.id)
    assert first.conversation.id == conversation.id
    [call] = [item for item in first.output if item.type == "function_call"]
    assert (call.name, call.arguments) == ("get_weather", ARGUMENTS)
    items = client.conversations.items.list(conversation.id, order="asc").data
    assert [item.type for item in items] == ["message", *[item.type for item in first.output]]
    assert [item.id for item in items[1:]] == [item.id for item in first.output]

    engine.script = scripts["answer"]
    second = client.responses.create(model="oss", tools=[WEATHER], conversation={"id": conversation.id},
                                     input=[{"type": "function_call_output", "call_id": call.call_id,
                                             "output": "sunny"}])
    assert second.output_text == "Hello there!"
    assert engine.prompts[-1] == prompt_after_weather_call(harmony, WEATHER, "Need weather.")
    after = client.conversations.items.list(conversation.id, order="asc", limit=100).data
    assert [item.type for item in after[len(items):]] == ["function_call_output",
                                                          *[item.type for item in second.output]]


def test_a_response_to_a_conversation_needs_no_input_of_its_own(client, engine, harmony):
    """The client adds the user's message as an item, then asks for the answer; without a conversation (or a
    previous response) there is nothing to answer."""
    conversation = client.conversations.create()
    client.conversations.items.create(conversation.id, items=[{"role": "user", "content": "Hi!"}])
    answered = client.responses.create(model="oss", conversation=conversation.id)
    client.responses.create(model="oss", input="Hi!", store=False)
    assert answered.output_text == "Hello there!" and engine.prompts[-2] == engine.prompts[-1]  # as if given inline
    listed = client.conversations.items.list(conversation.id, order="asc").data
    assert [item.type for item in listed] == ["message", *[item.type for item in answered.output]]
    with pytest.raises(openai.BadRequestError) as nothing:
        client.responses.create(model="oss")
    assert nothing.value.body["param"] == "input"


def test_a_streamed_response_adds_to_its_conversation_too(client):
    conversation = client.conversations.create()
    with client.responses.stream(model="oss", input="Hi!", conversation=conversation.id) as stream:
        final = stream.get_final_response()
    listed = client.conversations.items.list(conversation.id, order="asc").data
    assert [item.id for item in listed][1:] == [item.id for item in final.output]


def test_a_conversation_that_is_unknown_or_given_with_a_previous_response_is_refused(client):
    with pytest.raises(openai.NotFoundError) as unknown:
        client.responses.create(model="oss", input="Hi", conversation="conv_none")
    assert unknown.value.body["param"] == "conversation"
    conversation = client.conversations.create()
    first = client.responses.create(model="oss", input="Hi")
    with pytest.raises(openai.BadRequestError) as both:
        client.responses.create(model="oss", input="Hi", conversation=conversation.id,
                                previous_response_id=first.id)
    assert both.value.body["param"] == "conversation"
    assert client.conversations.items.list(conversation.id).data == []  # a refused request adds nothing


def test_the_store_evicts_the_least_recently_used_past_either_bound():
    store = ConversationStore(capacity=2, max_chars=10_000)

    def item(chars: int) -> dict:
        return {"id": f"msg_{chars}", "type": "message", "role": "user",
                "content": [{"type": "input_text", "text": "x" * chars}]}

    first = store.create("conv_1", 0, {}, [item(5_000)])
    store.create("conv_2", 0, {}, [])
    assert store.get("conv_1") is first  # now the most recent
    third = store.create("conv_3", 0, {}, [])
    assert store.get("conv_2") is None and store.get("conv_1") is first  # past the count
    store.add_items(third, [item(6_000)])  # past the characters: the least recently used goes
    assert store.get("conv_1") is None and store.get("conv_3") is third
    store.add_items(first, [item(1)])  # a response ending after its conversation went: nothing is kept
    assert store.get("conv_1") is None
    store.add_items(third, [item(20_000)])  # one conversation over the bound on its own goes too
    assert store.get("conv_3") is None
