"""GET /health: 200 while every engine is healthy, else 503; the body shows each engine's load.

The per-model ``running``/``waiting``/``kv_blocks_used`` fields let tests and operators see that aborted
requests really freed their sequences and KV blocks.
"""

from __future__ import annotations

import dataclasses

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from server.protocol import HealthResponse

router = APIRouter()


@router.get("/health", response_model=HealthResponse,
            responses={503: {"model": HealthResponse, "description": "an engine is not healthy"}})
async def health(request: Request) -> JSONResponse:
    models = request.app.state.models
    healthy = all(served.engine.healthy for served in models.values())
    body = {
        "status": "ok" if healthy else "unhealthy",
        "models": {
            name: {"healthy": served.engine.healthy, **dataclasses.asdict(served.engine.stats())}
            for name, served in models.items()
        },
    }
    return JSONResponse(body, status_code=200 if healthy else 503)
