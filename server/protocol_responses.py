"""The Responses API's request body, as OpenAI's API reference has it (the subset gptserve serves).

Output items and stream events are built as plain dicts in server/routes/response_output.py and read by the
OpenAI SDK's own types in the tests; the request is validated strictly, as every request body here is.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag
from pydantic.json_schema import SkipJsonSchema

from server.protocol import (
    CACHE_SALT_DESCRIPTION,
    INT64_BOUND,
    LOGPROBS_LIMIT,
    PRIORITY_DESCRIPTION,
    CacheSalt,
    NoOpFields,
)
from server.protocol_base import Integer, OptionalInteger, Strict
from server.protocol_tools import FunctionName

MAX_INPUT_ITEMS = 4096

# What `include` may ask for. "message.output_text.logprobs" adds the answer's tokens' logprobs; every other value
# names data of items this server never writes (built-in tools, images) or that it never hides (reasoning comes
# as plain `reasoning_text`), so asking changes nothing.
Includable = Literal["file_search_call.results", "web_search_call.results", "web_search_call.action.sources",
                     "message.input_image.image_url", "computer_call_output.output.image_url",
                     "code_interpreter_call.outputs", "reasoning.encrypted_content",
                     "message.output_text.logprobs"]


class TextPart(Strict):
    type: Literal["input_text", "output_text", "text"]
    text: str
    annotations: list[Any] | None = None
    logprobs: list[Any] | None = Field(None, description="an output_text part passed back: ignored")


class MessageItem(Strict):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[TextPart]
    id: str | None = None
    status: str | None = None


class FunctionCallItem(Strict):
    type: Literal["function_call"]
    call_id: str = Field(min_length=1, max_length=256)
    name: FunctionName
    arguments: str
    id: str | None = None
    status: str | None = None


class FunctionCallOutputItem(Strict):
    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1, max_length=256)
    output: str
    id: str | None = None
    status: str | None = None


class ReasoningText(Strict):
    type: Literal["reasoning_text"]
    text: str


class ReasoningItem(Strict):
    type: Literal["reasoning"]
    id: str | None = None
    summary: list[Any] = Field(default_factory=list)
    content: list[ReasoningText] | None = None
    encrypted_content: None = None
    status: str | None = None


def item_type(item: Any) -> str:
    """An item's `type`; a message may leave it out (`{"role": "user", "content": "Hi"}`, as OpenAI's examples do)."""
    if isinstance(item, dict):
        return item.get("type", "message")
    return getattr(item, "type", "message")


InputItem = Annotated[Annotated[MessageItem, Tag("message")] | Annotated[FunctionCallItem, Tag("function_call")]
                      | Annotated[FunctionCallOutputItem, Tag("function_call_output")]
                      | Annotated[ReasoningItem, Tag("reasoning")], Discriminator(item_type)]


class ItemList(BaseModel):
    """A page of items: a response's input items, or a conversation's."""

    object: Literal["list"] = "list"
    data: list[dict[str, Any]]
    first_id: str | None
    last_id: str | None
    has_more: bool

    @classmethod
    def of(cls, page: list[dict[str, Any]], has_more: bool) -> ItemList:
        return cls(data=page, first_id=page[0]["id"] if page else None, last_id=page[-1]["id"] if page else None,
                   has_more=has_more)


class FunctionToolParam(Strict):
    type: Literal["function"]
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ReasoningParam(Strict):
    effort: Literal["low", "medium", "high"] | None = None
    summary: Literal["auto", "concise", "detailed"] | None = Field(None, description="accepted; no summaries")


class TextFormat(Strict):
    type: Literal["text", "json_schema", "json_object"]
    name: str | None = None
    json_schema: dict[str, Any] | None = Field(None, alias="schema")
    description: str | None = None
    strict: bool | None = None


class TextParam(Strict):
    format: TextFormat | None = Field(
        None, description="json_schema and json_object constrain the output, as chat's response_format")


class NamedFunctionChoice(Strict):
    type: Literal["function"]
    name: str


class ResponseStreamOptions(Strict):
    include_obfuscation: bool | None = Field(None, description="accepted; events carry no obfuscation padding")


class ConversationParam(Strict):
    id: str = Field(max_length=256)


ResponseInput = str | Annotated[list[InputItem], Field(min_length=1, max_length=MAX_INPUT_ITEMS)]


def _input_as_documented(schema: dict[str, Any]) -> None:
    """The document asks for input always, as the rule it would need (input, or an existing conversation or
    previous response) names server state no schema-driven client can make: stated as an anyOf, it left
    schemathesis generating almost no request the server could serve. The server is the more lenient: without
    input it answers a conversation or previous response that exists (create_response says so with a 400)."""
    schema["required"] = sorted({*schema.get("required", []), "input"})


class ResponsesRequest(NoOpFields):
    model_config = ConfigDict(json_schema_extra=_input_as_documented)

    model: str
    input: ResponseInput | SkipJsonSchema[None] = Field(
        None, description="required unless conversation or previous_response_id gives a conversation to answer")
    instructions: str | None = None
    reasoning: ReasoningParam | None = None
    max_output_tokens: OptionalInteger = Field(None, ge=1, description="null: up to the context length")
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    priority: Integer = Field(0, ge=-INT64_BOUND, lt=INT64_BOUND, description=PRIORITY_DESCRIPTION)
    cache_salt: CacheSalt | None = Field(None, description=CACHE_SALT_DESCRIPTION)
    tools: Annotated[list[FunctionToolParam], Field(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedFunctionChoice | None = None
    parallel_tool_calls: bool | None = None
    text: TextParam | None = None
    stream: bool = False
    stream_options: ResponseStreamOptions | None = None
    store: bool = True
    background: bool = Field(False, description="answer at once (status queued); GET it, stream it, cancel it")
    previous_response_id: str | None = Field(None, max_length=256)
    conversation: Annotated[str, Field(max_length=256)] | ConversationParam | None = Field(
        None, description="a conversation's id: the response starts from its items and adds its input and output to "
        "them once it ends (not with previous_response_id)")
    truncation: Literal["auto", "disabled"] | None = Field(
        None, description="auto: drop the conversation's oldest items until it fits; disabled (default): a 400")
    include: Annotated[list[Includable], Field(max_length=16)] | None = None
    top_logprobs: OptionalInteger = Field(None, ge=0, lt=INT64_BOUND, description="alternatives for each token of the "
                                     "answer's logprobs, which it asks for as include's message.output_text.logprobs; "
                                     + LOGPROBS_LIMIT)
    max_tool_calls: OptionalInteger = Field(None, ge=0, lt=2**31, description="built-in tool calls: there are none")
    prompt_cache_retention: Literal["in_memory", "24h"] | None = Field(None, description="prefix caching is "
                                                                       "automatic, in memory")
