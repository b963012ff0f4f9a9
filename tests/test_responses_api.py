"""POST /v1/responses and GET /v1/responses/{id} through the OpenAI SDK, with the model's tokens scripted.

As in test_tool_calls_api, a scripted engine stands in for the model so that the output holds reasoning,
an answer or a function call for certain; the SDK's `responses.create` and `responses.stream` read it.
"""

from __future__ import annotations

import openai
import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.chat import ChatMessage
from server.config import ServerConfig
from server.generation_defaults import GenerationDefaults
from server.routes.models import ServedModel
from server.routes.response_store import ResponseStore, StoredResponse
from tests.test_chat_harmony import assistant, chat, harmony, tokenizer  # noqa: F401 - fixtures
from tests.test_tool_calls_api import ARGUMENTS, ScriptedEngine, model_tokens, prompt_after_weather_call

WEATHER = {"type": "function", "name": "get_weather", "description": "Current weather in a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


@pytest.fixture(scope="module")
def scripts(harmony, chat) -> dict[str, list[int]]:
    call = assistant(ARGUMENTS, "commentary", "functions.get_weather").with_content_type("<|constrain|>json")
    return {
        "answer": model_tokens(harmony, [assistant("Greet back.", "analysis"), assistant("Hello there!", "final")],
                               chat.tokens.return_),
        "call": model_tokens(harmony, [assistant("Need weather.", "analysis"), call], chat.tokens.call),
    }


@pytest.fixture(scope="module")
def engine(chat, scripts) -> ScriptedEngine:
    return ScriptedEngine(chat.tokenizer, scripts["answer"])


@pytest.fixture(scope="module")
def client(chat, engine) -> openai.OpenAI:
    app = create_app(ServerConfig(), {})
    with TestClient(app) as http:
        app.state.models["oss"] = ServedModel("oss", engine, chat, 0, {}, GenerationDefaults(chat.stop_token_ids))
        yield openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http, max_retries=0)


@pytest.fixture
def script(engine, scripts):
    def use(name: str) -> None:
        engine.script = scripts[name]

    yield use
    engine.script = scripts["answer"]


def test_a_text_answer_has_a_reasoning_item_then_a_message(client, harmony, scripts):
    response = client.responses.create(model="oss", input="Hi!", reasoning={"effort": "low"})
    assert response.status == "completed" and response.object == "response"
    reasoning, message = response.output
    assert reasoning.type == "reasoning" and reasoning.content[0].text == "Greet back."
    assert message.type == "message" and message.role == "assistant"
    assert response.output_text == "Hello there!"
    assert response.usage.input_tokens > 0 and response.usage.output_tokens == len(scripts["answer"])
    assert response.usage.output_tokens_details.reasoning_tokens == len(harmony.encode("Greet back."))


def test_the_sdk_stream_sees_the_event_sequence_and_the_same_response(client):
    with client.responses.stream(model="oss", input="Hi!") as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [event.type for event in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert "response.reasoning_text.delta" in kinds and "response.output_text.delta" in kinds
    assert kinds.index("response.reasoning_text.delta") < kinds.index("response.output_text.delta")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == final.output_text == "Hello there!"


def test_a_function_call_and_its_output_continue_through_previous_response_id(client, engine, script, harmony):
    script("call")
    first = client.responses.create(model="oss", input="Weather in Oslo?", tools=[WEATHER], instructions="Be brief.")
    [call] = [item for item in first.output if item.type == "function_call"]
    assert (call.name, call.arguments) == ("get_weather", ARGUMENTS) and call.call_id.startswith("call_")
    script("answer")
    second = client.responses.create(model="oss", previous_response_id=first.id, tools=[WEATHER],
                                     input=[{"type": "function_call_output", "call_id": call.call_id,
                                             "output": "sunny"}])
    assert second.previous_response_id == first.id and second.output_text == "Hello there!"
    assert engine.prompts[-1] == prompt_after_weather_call(harmony, WEATHER, "Need weather."), \
        "instructions are not carried over; the rest of the conversation is"


def test_the_sdk_s_function_calling_loop_passes_output_items_back_as_input(client, engine, script, harmony):
    """OpenAI's function-calling guide: messages without a `type`, then `input += response.output`."""
    script("call")
    conversation: list = [{"role": "user", "content": "Weather in Oslo?"}]
    first = client.responses.create(model="oss", input=conversation, tools=[WEATHER], store=False)
    conversation += first.output
    [call] = [item for item in first.output if item.type == "function_call"]
    conversation.append({"type": "function_call_output", "call_id": call.call_id, "output": "sunny"})
    script("answer")
    second = client.responses.create(model="oss", input=conversation, tools=[WEATHER], store=False)
    assert second.output_text == "Hello there!"
    assert engine.prompts[-1] == prompt_after_weather_call(harmony, WEATHER, "Need weather.")


def test_an_output_text_part_passed_back_may_carry_logprobs(client):
    message = {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
               "content": [{"type": "output_text", "text": "Hi.", "annotations": [], "logprobs": []}]}
    response = client.responses.create(model="oss", input=[{"role": "user", "content": "Hi!"}, message,
                                                           {"role": "user", "content": "Again?"}])
    assert response.status == "completed"


def test_a_stored_response_can_be_read_back_and_an_unknown_one_is_404(client):
    created = client.responses.create(model="oss", input="Hi!")
    assert client.responses.retrieve(created.id).output_text == created.output_text
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve("resp_unknown")
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="oss", input="Hi!", previous_response_id="resp_unknown")
    unstored = client.responses.create(model="oss", input="Hi!", store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)


def test_max_output_tokens_cut_makes_the_response_incomplete(client):
    response = client.responses.create(model="oss", input="Hi!", max_output_tokens=3)
    assert response.status == "incomplete"
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.usage.output_tokens == 3


def test_the_store_evicts_the_least_recently_used_response():
    store = ResponseStore(capacity=2)
    for name in ("a", "b"):
        store.put(name, StoredResponse({"id": name}, [ChatMessage("user", name)], []))
    assert store.get("a") is not None  # "a" is now the most recently used
    store.put("c", StoredResponse({"id": "c"}, [], []))
    assert store.get("b") is None and store.get("a") is not None and store.get("c") is not None


def test_the_store_evicts_the_least_recently_used_responses_past_its_character_budget():
    store = ResponseStore(capacity=100, max_chars=25)
    for name in ("a", "b"):
        store.put(name, StoredResponse({"id": name}, [ChatMessage("user", name * 10)], []))
    assert store.get("a") is not None  # "a" is now the most recently used
    store.put("c", StoredResponse({"id": "c"}, [ChatMessage("user", "c"), ChatMessage("assistant", "d" * 5)], []))
    assert store.get("b") is None and store.get("a") is not None and store.get("c") is not None
    assert store.delete("a") and not store.delete("a")
    store.put("e", StoredResponse({"id": "e"}, [ChatMessage("user", "e" * 19)], []))
    assert store.get("c") is not None and store.get("e") is not None, "deleting 'a' gave its 10 back"


def test_a_streamed_function_call_has_argument_deltas_and_ends_as_a_function_call_item(client, script):
    script("call")
    with client.responses.stream(model="oss", input="Weather in Oslo?", tools=[WEATHER]) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [event.type for event in events]
    added = [e.item for e in events if e.type == "response.output_item.added"]
    assert [item.type for item in added] == ["reasoning", "function_call"]
    assert added[1].name == "get_weather" and added[1].arguments == ""
    deltas = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    assert len(deltas) > 1 and "".join(deltas) == ARGUMENTS
    assert kinds.index("response.function_call_arguments.done") < kinds.index("response.completed")
    [call] = [item for item in final.output if item.type == "function_call"]
    assert (call.name, call.arguments, call.status) == ("get_weather", ARGUMENTS, "completed")
