"""GET /ready: readiness for load balancers and orchestrators, apart from /health's liveness.

Ready means this process can answer a generation request now: at least one model is loaded and every model's
engine thread is running and has not failed. A balancer that sends traffic only to ready replicas skips one
whose engine died; /health stays the liveness probe that says whether to restart it.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

router = APIRouter()


class ReadyResponse(BaseModel):
    status: str  # "ready" or "not_ready"
    models: dict[str, bool]  # served name -> its engine is stepping


@router.get("/ready", response_model=ReadyResponse,
            responses={503: {"model": ReadyResponse, "description": "no model loaded, or an engine failed"}})
async def ready(request: Request) -> JSONResponse:
    engines = {name: served.engine.healthy for name, served in request.app.state.models.items()}
    is_ready = bool(engines) and all(engines.values())
    body = ReadyResponse(status="ready" if is_ready else "not_ready", models=engines)
    return JSONResponse(body.model_dump(), status_code=200 if is_ready else 503)
