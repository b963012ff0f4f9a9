"""POST /tokenize, POST /detokenize and GET /tokenizer_info, as vLLM serves them at the root: the exact ids a
completions or chat request would feed the model (so clients can count and budget tokens), ids back to text, and
the tokenizer's special tokens and chat template (so a client needs no copy of the tokenizer)."""

from __future__ import annotations

from fastapi import APIRouter, Query, Request

from models.tokenizer import byte_level_text
from server.routes.chat_prompt import render_chat_fields
from server.routes.models import find_model
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
        ids = await render_chat_fields(served, body)
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
