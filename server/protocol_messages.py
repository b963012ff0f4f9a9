"""Chat messages in a request, typed by role as OpenAI's API reference types them.

Each role is its own model (OpenAI's deprecated ``function`` role too), and the message is a union discriminated
by ``role``, so the OpenAPI schema states what a role may carry: only an assistant makes tool calls, a tool
message names the call it answers. The union's tags end in ``-message`` (content parts' in ``-part``) so a
validation error names the field as the client wrote it (server.validation_errors drops the tags). Content is
optional for every role but ``function``, as it was before the split.

Content parts this server cannot read (images, audio, files) are left out of the schema, which states what is
served; a request with one is a 400 naming the part.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, GetJsonSchemaHandler, Tag, model_validator
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import PydanticCustomError

from server.protocol_base import Strict
from server.protocol_tools import FunctionCallParam, FunctionName, ToolCallParam

UNREADABLE_PARTS = ("image_url", "input_audio", "file")

Name = Annotated[str, Field(max_length=256, description="tells apart participants of the same role")]


class TextContentPart(Strict):
    type: Literal["text"]
    text: str

    @model_validator(mode="before")
    @classmethod
    def _readable(cls, data: Any) -> Any:
        kind = data.get("type") if isinstance(data, dict) else None
        if kind in UNREADABLE_PARTS:
            raise PydanticCustomError("unsupported_content_part",
                                      "{kind} content parts are not supported: this server reads text only",
                                      {"kind": kind})
        return data


class RefusalContentPart(Strict):
    type: Literal["refusal"]
    refusal: str


def _tag(value: Any, field: str, suffix: str) -> str | None:
    """A body's dict or an already parsed model (a /tokenize body becomes a chat request) by its ``field``."""
    tag = value.get(field) if isinstance(value, dict) else getattr(value, field, None)
    return f"{tag}-{suffix}" if isinstance(tag, str) else None


def _part_tag(part: Any) -> str | None:
    return _tag(part, "type", "part")


AssistantContentPart = Annotated[
    Annotated[TextContentPart, Tag("text-part")] | Annotated[RefusalContentPart, Tag("refusal-part")],
    Discriminator(_part_tag, custom_error_type="content_part_type",
                  custom_error_message="a content part's type must be 'text' or 'refusal'"),
]
TextContent = str | list[TextContentPart]


class SystemMessage(Strict):
    role: Literal["system"]
    content: TextContent | None = None
    name: Name | None = None


class DeveloperMessage(Strict):
    role: Literal["developer"]
    content: TextContent | None = None
    name: Name | None = None


class UserMessage(Strict):
    role: Literal["user"]
    content: TextContent | None = None
    name: Name | None = None


class AssistantMessage(Strict):
    role: Literal["assistant"]
    content: str | list[AssistantContentPart] | None = None
    refusal: str | None = Field(None, description="the turn's refusal, shown to the model as the turn's text")
    name: Name | None = None
    reasoning: str | None = Field(None, description="an earlier assistant turn's reasoning")
    reasoning_content: str | None = Field(None, description="older name of `reasoning`, still accepted")
    tool_calls: Annotated[list[ToolCallParam], Field(max_length=128)] | None = Field(
        None, description="the calls the turn made")
    function_call: FunctionCallParam | None = Field(
        None, description="deprecated form of one tool call, taken as a call of that function")
    # What the OpenAI SDK sends back when a client appends a response's message to the conversation:
    audio: None = Field(None, description="accepted as null: this server makes no audio")
    annotations: list[dict[str, Any]] | None = Field(None, description="accepted and ignored (an answer's citations)")


class ToolMessage(Strict):
    role: Literal["tool"]
    content: TextContent | None = None
    tool_call_id: str = Field(min_length=1, max_length=256, description="the call this message answers")
    name: Name | None = Field(None, description="accepted, as vLLM accepts it; the call's id names the function")


class FunctionMessage(Strict):
    """OpenAI's deprecated form of a tool message, still accepted: the result of the function ``name``."""

    role: Literal["function"]
    content: str | None
    name: FunctionName


def _role_tag(message: Any) -> str | None:
    return _tag(message, "role", "message")


class _RoleDiscriminated:
    """States in the schema, as OpenAI's own OpenAPI document does, that ``role`` picks the message's shape
    (pydantic writes no ``discriminator`` keyword for a union it tells apart with a function)."""

    def __get_pydantic_json_schema__(self, core_schema: Any, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        schema = handler(core_schema)
        mapping = {handler.resolve_ref_schema(branch)["properties"]["role"]["const"]: branch["$ref"]
                   for branch in schema["oneOf"]}
        schema["discriminator"] = {"propertyName": "role", "mapping": mapping}
        return schema


ChatMessageParam = Annotated[
    Annotated[SystemMessage, Tag("system-message")] | Annotated[DeveloperMessage, Tag("developer-message")]
    | Annotated[UserMessage, Tag("user-message")] | Annotated[AssistantMessage, Tag("assistant-message")]
    | Annotated[ToolMessage, Tag("tool-message")] | Annotated[FunctionMessage, Tag("function-message")],
    Discriminator(_role_tag, custom_error_type="message_role",
                  custom_error_message="a message is an object whose role is 'system', 'developer', 'user', "
                                       "'assistant', 'tool' or 'function'"),
    _RoleDiscriminated(),
]
