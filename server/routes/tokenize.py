"""POST /tokenize, POST /detokenize and GET /tokenizer_info, as vLLM serves them at the root: the exact ids a
completions or chat request would feed the model (so clients can count and budget tokens), ids back to text, and
the tokenizer's special tokens and chat template (so a client needs no copy of the tokenizer)."""

from __future__ import annotations

from fastapi import APIRouter, Query, Request
from pydantic import ValidationError

from models.tokenizer import byte_level_text
from server.protocol import APIError, ChatCompletionRequest
from server.routes.chat_prompt import render_chat_prompt
from server.routes.models import ServedModel, find_model
from server.routes.sampling import check_token_ids, tokenize_prompts
from server.tokenizer_protocol import (
    TOKENIZER_RESPONSES,
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeChatRequest,
    TokenizeRequest,
    TokenizeResponse,
    TokenizerInfoResponse,
)

router = APIRouter()


@router.post("/tokenize", response_model=TokenizeResponse, responses=TOKENIZER_RESPONSES)
async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
    served = find_model(request, body.model)
    tokenizer = served.engine.tokenizer
    if isinstance(body, TokenizeChatRequest):
        ids = await _chat_prompt(served, body)
    else:
        ids = tokenize_prompts(body.prompt, tokenizer)[0]
    token_strs = [byte_level_text(tokenizer.token_bytes(t)) for t in ids] if body.return_token_strs else None
    return TokenizeResponse(count=len(ids), max_model_len=served.engine.max_model_len, tokens=ids,
                            token_strs=token_strs)


@router.post("/detokenize", response_model=DetokenizeResponse, responses=TOKENIZER_RESPONSES)
async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    tokenizer = find_model(request, body.model).engine.tokenizer
    check_token_ids(body.tokens, tokenizer, "tokens")
    return DetokenizeResponse(prompt=tokenizer.decode(body.tokens))


@router.get("/tokenizer_info", response_model=TokenizerInfoResponse, responses=TOKENIZER_RESPONSES)
async def get_tokenizer_info(request: Request, model: str | None = Query(None)) -> TokenizerInfoResponse:
    return TokenizerInfoResponse.model_validate(find_model(request, model).tokenizer_info)


async def _chat_prompt(served: ServedModel, body: TokenizeChatRequest) -> list[int]:
    """The chat request these fields make, rendered by the chat endpoint's own code."""
    names = ("messages", "tools", "tool_choice", "reasoning_effort", "add_generation_prompt", "continue_final_message",
             "chat_template", "chat_template_kwargs", "documents")
    fields = {name: getattr(body, name) for name in names if getattr(body, name) is not None}
    fields["model"] = served.name  # the body may leave it out
    try:
        chat_request = ChatCompletionRequest.model_validate(fields)
    except ValidationError as e:
        first = e.errors()[0]
        path = ".".join(str(part) for part in first["loc"])
        raise APIError(400, f"{path}: {first['msg']}", param=str(first["loc"][0])) from None
    return await render_chat_prompt(served, chat_request)
