"""POST /tokenize and POST /detokenize, as vLLM serves them at the root: the exact ids a completions or chat
request would feed the model (so clients can count and budget tokens), and ids back to text."""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import ValidationError

from models.tokenizer import Tokenizer, byte_level_text
from server.protocol import APIError, ChatCompletionRequest
from server.routes.chat_completions import render_prompt
from server.routes.models import ServedModel, find_model
from server.routes.sampling import check_token_ids, tokenize_prompts
from server.tokenizer_protocol import (
    CHAT_ONLY_FIELDS,
    TOKENIZER_RESPONSES,
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
)

router = APIRouter()


@router.post("/tokenize", response_model=TokenizeResponse, responses=TOKENIZER_RESPONSES)
async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
    served = find_model(request, body.model)
    tokenizer = served.engine.tokenizer
    ids = _chat_prompt(served, body) if body.messages is not None else _text_prompt(body, tokenizer)
    token_strs = [byte_level_text(tokenizer.token_bytes(t)) for t in ids] if body.return_token_strs else None
    return TokenizeResponse(count=len(ids), max_model_len=served.engine.max_model_len, tokens=ids,
                            token_strs=token_strs)


@router.post("/detokenize", response_model=DetokenizeResponse, responses=TOKENIZER_RESPONSES)
async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    tokenizer = find_model(request, body.model).engine.tokenizer
    check_token_ids(body.tokens, tokenizer, "tokens")
    return DetokenizeResponse(prompt=tokenizer.decode(body.tokens))


def _text_prompt(body: TokenizeRequest, tokenizer: Tokenizer) -> list[int]:
    if body.prompt is None:
        raise APIError(400, "prompt: give a prompt (text) or messages (a chat)", param="prompt")
    for field in CHAT_ONLY_FIELDS:
        if field in body.model_fields_set:
            raise APIError(400, f"{field}: only with messages, not with a prompt", param=field)
    return tokenize_prompts(body.prompt, tokenizer)[0]


def _chat_prompt(served: ServedModel, body: TokenizeRequest) -> list[int]:
    """The chat request these fields make, rendered by the chat endpoint's own code."""
    if body.prompt is not None:
        raise APIError(400, "prompt: give a prompt or messages, not both", param="prompt")
    fields = {"model": body.model, "messages": body.messages, "reasoning_effort": body.reasoning_effort}
    for field in ("tools", "tool_choice"):  # checked by the chat request's own fields
        if getattr(body, field) is not None:
            fields[field] = getattr(body, field)
    try:
        chat_request = ChatCompletionRequest.model_validate(fields)
    except ValidationError as e:
        first = e.errors()[0]
        path = ".".join(str(part) for part in first["loc"])
        raise APIError(400, f"{path}: {first['msg']}", param=str(first["loc"][0])) from None
    return render_prompt(served, chat_request)
