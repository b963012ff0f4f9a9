"""GET /load: vLLM's server-load signal for load balancers, served with --enable-server-load-tracking.

``server_load`` counts the requests in flight that make a model work (completions, chat, Responses, embeddings,
scores, reranking, perplexity, SageMaker's invocations), from admission by the gateway to the last byte of their
reply, streams included. Open like /health, as vLLM serves it outside /v1.
"""

from __future__ import annotations

import re

from fastapi import APIRouter, Request
from pydantic import BaseModel

router = APIRouter()

# What vLLM's load_aware_call counts: the routes that run a model, a stored response fetched (it may stream) or
# cancelled among them; /tokenize and the listing routes do not.
_WORK = re.compile(r"/v1/(completions|chat/completions|responses|embeddings|score|rerank|perplexity)"
                   r"|/(score|rerank|v2/rerank|invocations)|/v1/responses/[^/]+/cancel")
_STORED_RESPONSE = re.compile(r"/v1/responses/[^/]+")


def counts_as_load(method: str, path: str) -> bool:
    """Whether a request to ``path`` (the root path stripped) is one /load counts."""
    if method == "POST":
        return _WORK.fullmatch(path) is not None
    return method == "GET" and _STORED_RESPONSE.fullmatch(path) is not None


class ServerLoad:
    """Requests in flight that make a model work; read only by the event loop's own tasks, so a plain count."""

    def __init__(self) -> None:
        self.in_flight = 0


class LoadResponse(BaseModel):
    server_load: int


@router.get("/load", response_model=LoadResponse)
async def get_load(request: Request) -> LoadResponse:
    return LoadResponse(server_load=request.app.state.server_load.in_flight)
