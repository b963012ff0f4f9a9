"""GET /metrics: Prometheus text exposition of the process's registry."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from server.protocol import GATEWAY_RESPONSES

router = APIRouter()

EXPOSITION = {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Prometheus text format"}


@router.get("/metrics", response_class=Response, responses={200: EXPOSITION, 401: GATEWAY_RESPONSES[401]})
async def metrics(request: Request) -> Response:
    body, content_type = request.app.state.metrics.exposition()
    return Response(body, media_type=content_type)
