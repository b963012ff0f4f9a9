"""A chat message's fields depend on its role, and the request schema says so (a client or fuzzer reading the
OpenAPI document knows a tool message needs tool_call_id); a message that breaks its role's rules is a 400
naming the field as the client wrote it."""

from __future__ import annotations

import jsonschema
import pytest
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from server.chat import ChatMessage, ToolCall
from server.protocol import ChatCompletionRequest
from server.protocol_messages import AssistantMessage
from server.routes.chat_prompt import chat_message
from server.validation_errors import validation_error_object

SCHEMA = jsonschema.Draft202012Validator(ChatCompletionRequest.model_json_schema())
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
QUESTION = {"role": "user", "content": "Weather?"}
BY_ROLE = {"system": {"role": "system", "content": "Be brief."},
           "developer": {"role": "developer", "content": "Answer in French."},
           "user": QUESTION,
           "assistant": {"role": "assistant", "content": "Let me look.", "tool_calls": [CALL]},
           "tool": {"role": "tool", "content": "sunny", "tool_call_id": "call_1"},
           "function": {"role": "function", "content": "sunny", "name": "get_weather"}}


def body(*messages: dict) -> dict:
    return {"model": "tiny", "messages": [QUESTION, *messages]}


def schema_allows(request: dict) -> bool:
    return SCHEMA.is_valid(request)


def refusal(request: dict) -> tuple[str, str | None]:
    """The 400's message and param, as the app words a body's validation failure."""
    with pytest.raises(ValidationError) as raised:
        ChatCompletionRequest.model_validate(request)
    errors = [error | {"loc": ("body", *error["loc"])} for error in raised.value.errors()]
    error = validation_error_object(RequestValidationError(errors))
    return error.message, error.param


def test_every_role_is_served_in_its_own_shape():
    request = body(*BY_ROLE.values())
    assert schema_allows(request)
    ChatCompletionRequest.model_validate(request)


def test_a_tool_message_must_name_the_call_it_answers():
    without_id = body(BY_ROLE["assistant"], {"role": "tool", "content": "sunny"})
    assert not schema_allows(without_id)
    assert refusal(without_id) == ("messages[2].tool_call_id: Field required", "messages")


@pytest.mark.parametrize("role", ["system", "developer", "user", "tool", "function"])
def test_only_an_assistant_message_makes_tool_calls(role):
    request = body(BY_ROLE[role] | {"tool_calls": [CALL]})
    assert not schema_allows(request)
    message, param = refusal(request)
    assert message == f"messages[1].tool_calls: unknown or unsupported parameter for role '{role}'"
    assert param == "messages"


@pytest.mark.parametrize(("role", "field", "value"), [
    ("user", "tool_call_id", "call_1"), ("system", "reasoning", "hm"), ("user", "refusal", "no"),
    ("tool", "reasoning_content", "hm"), ("developer", "tool_call_id", "call_1"), ("function", "tool_call_id", "c")])
def test_a_field_of_another_role_is_refused_by_name(role, field, value):
    request = body(BY_ROLE[role] | {field: value})
    assert not schema_allows(request)
    assert refusal(request)[0] == f"messages[1].{field}: unknown or unsupported parameter for role '{role}'"


@pytest.mark.parametrize("role", ["system", "developer", "user", "tool", "assistant"])
def test_message_content_may_be_left_out_as_before(role):
    message = {key: value for key, value in BY_ROLE[role].items() if key != "content"}
    assert schema_allows(body(message))


@pytest.mark.parametrize("role", ["moderator", "User", None])
def test_an_unknown_or_missing_role_names_the_roles_there_are(role):
    request = body({"role": role, "content": "x"} if role else {"content": "x"})
    assert not schema_allows(request)
    message, param = refusal(request)
    assert message.startswith("messages[1]: a message is an object whose role is 'system', 'developer'")
    assert param == "messages"


@pytest.mark.parametrize("part", [{"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
                                  {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}},
                                  {"type": "file", "file": {"file_id": "file-1"}}])
def test_a_content_part_this_server_cannot_read_is_a_400_naming_the_part(part):
    request = body({"role": "user", "content": [{"type": "text", "text": "What is this?"}, part]})
    assert not schema_allows(request), "the schema lists only what is served"
    message, param = refusal(request)
    assert message == f"messages[1].content[1]: {part['type']} content parts are not supported: this server " \
                      "reads text only"
    assert param == "messages"


def test_only_an_assistant_message_takes_refusal_parts():
    refused = [{"type": "text", "text": "I can't "}, {"type": "refusal", "refusal": "help with that."}]
    assert schema_allows(body({"role": "assistant", "content": refused}))
    assert not schema_allows(body({"role": "user", "content": refused}))
    assert refusal(body({"role": "assistant", "content": [{"type": "image_url"}]}))[0] == \
        "messages[1].content[0]: a content part's type must be 'text' or 'refusal'"


def test_an_assistant_refusal_is_shown_to_the_model_as_the_turns_text():
    parts = AssistantMessage.model_validate({"role": "assistant", "content": [
        {"type": "text", "text": "I can't "}, {"type": "refusal", "refusal": "help with that."}]})
    assert chat_message(parts) == ChatMessage("assistant", "I can't help with that.")
    field = AssistantMessage.model_validate({"role": "assistant", "refusal": "No."})
    assert chat_message(field) == ChatMessage("assistant", "No.")


def test_a_function_message_must_name_its_function_and_give_its_content():
    assert not schema_allows(body({"role": "function", "content": "sunny"}))
    assert refusal(body({"role": "function", "content": "sunny"}))[0] == "messages[1].name: Field required"
    assert not schema_allows(body({"role": "function", "name": "get_weather"}))
    assert schema_allows(body({"role": "function", "name": "get_weather", "content": None}))


def test_a_function_message_is_the_named_functions_result():
    message = ChatCompletionRequest.model_validate(body(BY_ROLE["function"])).messages[1]
    assert chat_message(message) == ChatMessage("tool", "sunny", name="get_weather")


def test_an_assistant_turn_keeps_its_reasoning_and_calls():
    turn = AssistantMessage.model_validate({"role": "assistant", "reasoning_content": "Look it up.",
                                            "tool_calls": [CALL]})
    assert chat_message(turn) == ChatMessage("assistant", "", reasoning="Look it up.",
                                             tool_calls=[ToolCall("call_1", "get_weather", "{}")])


def test_an_assistant_message_echoed_by_the_openai_sdk_is_served():
    """``messages.append(response.choices[0].message)``: the SDK sends the message back with every field it
    parsed, nulls and an empty annotations list included; and the deprecated ``function_call`` is a call."""
    from openai._utils import maybe_transform
    from openai.types.chat import ChatCompletionMessage, completion_create_params

    answer = ChatCompletionMessage.model_validate({
        "role": "assistant", "content": None, "refusal": None, "annotations": [], "audio": None,
        "function_call": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}, "tool_calls": None})
    sent = maybe_transform({"model": "tiny", "messages": [QUESTION, answer, BY_ROLE["function"]]},
                           completion_create_params.CompletionCreateParamsNonStreaming)
    assert sent["messages"][1]["annotations"] == [] and "audio" in sent["messages"][1]
    assert schema_allows(sent)
    request = ChatCompletionRequest.model_validate(sent)
    assert chat_message(request.messages[1]).tool_calls == [ToolCall("", "get_weather", '{"city": "Oslo"}')]
