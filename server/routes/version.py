"""GET /version, as vLLM serves it at the root: which gptserve answers (open like /health, no API key)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from fastapi import APIRouter

from server.tokenizer_protocol import VersionResponse

router = APIRouter()


def _installed_version() -> str:
    try:
        return version("gptserve")
    except PackageNotFoundError:  # run from a source tree that pip never installed
        return "unknown"


SERVER_VERSION = _installed_version()


@router.get("/version", response_model=VersionResponse)
async def get_version() -> VersionResponse:
    return VersionResponse(version=SERVER_VERSION)
