"""Bodies of the tokenizer endpoints, named as vLLM names them (/tokenize, /detokenize, /version at the root).

Kept apart from ``server.protocol`` (the OpenAI endpoints' bodies) so each file holds one API's shapes.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field

from server.protocol import GATEWAY_RESPONSES, ChatMessageParam, ErrorResponse, Strict

CHAT_ONLY_FIELDS = ("tools", "tool_choice", "reasoning_effort", "add_generation_prompt", "continue_final_message")


class TokenizeRequest(Strict):
    """Either a ``prompt``, encoded as /v1/completions encodes it, or ``messages`` (with ``tools`` and
    ``reasoning_effort``), rendered as /v1/chat/completions renders them: ``count`` is that request's
    ``usage.prompt_tokens``."""

    model: str
    prompt: str | None = None
    messages: Annotated[list[ChatMessageParam], Field(min_length=1)] | None = None
    tools: list[dict[str, Any]] | None = Field(None, description="as chat completions takes them")
    tool_choice: str | dict[str, Any] | None = Field(None, description="as chat completions takes it (none: no tools)")
    reasoning_effort: Literal["low", "medium", "high"] | None = None
    add_generation_prompt: Literal[True] = Field(True, description="chat prompts always end where the "
                                                 "assistant's reply starts, as the chat endpoint renders them")
    continue_final_message: Literal[False] = False
    add_special_tokens: bool = Field(True, description="accepted; these tokenizers add no special tokens")
    return_token_strs: bool = Field(False, description="also return each token as its byte-level string")


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(Strict):
    model: str
    tokens: list[Annotated[int, Field(ge=0)]]


class DetokenizeResponse(BaseModel):
    prompt: str


class VersionResponse(BaseModel):
    version: str


TOKENIZER_RESPONSES = GATEWAY_RESPONSES | {
    400: {"model": ErrorResponse, "description": "invalid request"},
    404: {"model": ErrorResponse, "description": "unknown model"},
}
