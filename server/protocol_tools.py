"""Function tools in chat completions, as OpenAI's API reference has them: definitions, calls, call deltas."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field

from server.protocol_base import Strict, WithoutNulls

FunctionName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]


class FunctionCallParam(Strict):
    name: FunctionName
    arguments: str = Field(description="JSON text, put in the prompt verbatim")


class ToolCallParam(Strict):
    id: str = Field(min_length=1, max_length=256)
    type: Literal["function"] = "function"
    function: FunctionCallParam


class FunctionDefinition(Strict):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="JSON schema of the arguments")
    strict: bool | None = Field(
        None, description="accepted; a forced call's arguments always follow the schema, other calls are free")


class ChatTool(Strict):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(Strict):
    name: str


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: NamedFunction


class FunctionCall(BaseModel):
    name: str
    arguments: str = Field(description="JSON text as the model wrote it")


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionCallDelta(WithoutNulls):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(WithoutNulls):
    """The first delta of a call carries index, id, type and name; later ones index and argument text."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta
