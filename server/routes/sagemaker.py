"""Amazon SageMaker's container contract, as vLLM serves it: ``GET``/``POST /ping`` and ``POST /invocations``.

SageMaker sends every request to /invocations; the body's own fields say which API it is for (``messages``:
chat, ``prompt``: completions, ``input``: embeddings, ``text_1``: score, ``query``: rerank), and it is then
checked and answered by that route exactly as at its own path. /ping is /health (SageMaker takes any 200 as
healthy), open without the API key as /health is.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Request
from pydantic import Discriminator, Tag

from server.protocol import (
    ERROR_RESPONSES,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    EmbeddingRequest,
    EmbeddingResponse,
    HealthResponse,
    RerankRequest,
    RerankResponse,
    ScoreRequest,
    ScoreResponse,
    sse_responses,
)
from server.routes import chat_completions, completions, embeddings, health, scores

router = APIRouter()

# The body field that names the API, and the tag of that API's form; the first field found wins.
FORM_BY_FIELD = {"messages": "chat-form", "prompt": "completion-form", "input": "embedding-form",
                 "text_1": "score-form", "query": "rerank-form"}
HANDLERS: dict[type, Callable[[Any, Request], Awaitable[Any]]] = {
    ChatCompletionRequest: chat_completions.create_chat_completion, CompletionRequest: completions.create_completion,
    EmbeddingRequest: embeddings.create_embeddings, ScoreRequest: scores.create_score, RerankRequest: scores.rerank}


def _form(body: Any) -> str | None:
    return next((FORM_BY_FIELD[field] for field in FORM_BY_FIELD if field in body), None) \
        if isinstance(body, dict) else None


InvocationRequest = Annotated[
    Annotated[ChatCompletionRequest, Tag("chat-form")] | Annotated[CompletionRequest, Tag("completion-form")]
    | Annotated[EmbeddingRequest, Tag("embedding-form")] | Annotated[ScoreRequest, Tag("score-form")]
    | Annotated[RerankRequest, Tag("rerank-form")],
    Discriminator(_form, custom_error_type="invocation_form",
                  custom_error_message="the body names no API: give messages (chat), prompt (completions), input "
                                       "(embeddings), text_1 (score) or query (rerank)"),
]


@router.get("/ping", response_model=HealthResponse,
            responses={503: {"model": HealthResponse, "description": "an engine is not healthy"}})
@router.post("/ping", response_model=HealthResponse,
             responses={503: {"model": HealthResponse, "description": "an engine is not healthy"}})
async def ping(request: Request) -> Any:
    return await health.health(request)


@router.post("/invocations",
             response_model=ChatCompletionResponse | CompletionResponse | EmbeddingResponse | ScoreResponse
             | RerankResponse, responses=sse_responses(CompletionResponse) | ERROR_RESPONSES)
async def invocations(body: InvocationRequest, request: Request) -> Any:
    return await HANDLERS[type(body)](body, request)
