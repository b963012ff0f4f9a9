"""Bodies of the tokenizer endpoints, named as vLLM names them (/tokenize, /detokenize, /tokenizer_info, /version
at the root). As in vLLM, ``model`` may be left out where the server serves one model.

Kept apart from ``server.protocol`` (the OpenAI endpoints' bodies) so each file holds one API's shapes.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag

from server.protocol import GATEWAY_RESPONSES, ChatTemplateFields, ErrorResponse, Strict, TokenId, messages_or_prompt
from server.protocol_messages import ChatMessageParam
from server.protocol_tools import ChatTool, NamedToolChoice


class TokenizeCompletionRequest(Strict):
    """A ``prompt``, encoded as /v1/completions encodes it."""

    model: str | None = None
    prompt: str
    add_special_tokens: bool = Field(True, description="accepted; these tokenizers add no special tokens")
    return_token_strs: bool = Field(False, description="also return each token as its byte-level string")


class TokenizeChatRequest(ChatTemplateFields):
    """``messages`` (with ``tools`` and ``reasoning_effort``), rendered as /v1/chat/completions renders them:
    ``count`` is that request's ``usage.prompt_tokens``."""

    model: str | None = None
    messages: Annotated[list[ChatMessageParam], Field(min_length=1)]
    tools: Annotated[list[ChatTool], Field(max_length=128)] | None = Field(None, description="as chat completions")
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description="as chat completions takes it (none: no tools)")
    reasoning_effort: Literal["low", "medium", "high"] | None = None
    add_generation_prompt: bool = Field(True, description="as chat completions")
    continue_final_message: bool = Field(False, description="as chat completions")
    add_special_tokens: bool = Field(True, description="accepted; these tokenizers add no special tokens")
    return_token_strs: bool = Field(False, description="also return each token as its byte-level string")


# Two shapes, as vLLM has them, so the schema says what a valid body is: a prompt or messages, never both,
# and chat-only fields only with messages.
TokenizeRequest = Annotated[
    Annotated[TokenizeCompletionRequest, Tag("completion-form")] | Annotated[TokenizeChatRequest, Tag("chat-form")],
    Discriminator(messages_or_prompt),
]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(Strict):
    model: str | None = None
    tokens: list[TokenId]


class DetokenizeResponse(BaseModel):
    prompt: str


class TokenizerInfoResponse(BaseModel):
    """The checkpoint's tokenizer_config.json as this server holds it (server/tokenizer_info.py): its other keys
    pass through."""

    model_config = ConfigDict(extra="allow")
    tokenizer_class: str
    eos_token: str
    bos_token: str | None = None
    unk_token: str | None = None
    pad_token: str | None = None
    model_max_length: int
    chat_template: str | None = None


class VersionResponse(BaseModel):
    version: str


TOKENIZER_RESPONSES = GATEWAY_RESPONSES | {
    400: {"model": ErrorResponse, "description": "invalid request"},
    404: {"model": ErrorResponse, "description": "unknown model"},
}
