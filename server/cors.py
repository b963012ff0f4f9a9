"""CORS for browser clients (``--allowed-origins``, vLLM's ``--allowed-methods``, ``--allowed-headers`` and
``--allow-credentials``): Starlette's middleware, set up for this API.

Preflights from the listed origins (exact matches, or any with ``*``) are answered with the allowed methods and
request headers; by default every header a preflight asks for, as browser code using the OpenAI SDK sends its own
(x-stainless-*). A refused preflight gets the contract's error object instead of Starlette's plain text. Without
``--allowed-origins`` the app has no such middleware, so no response carries a CORS header.
"""

from __future__ import annotations

from fastapi.responses import JSONResponse, Response
from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp

from server.config import HTTPConfig
from server.protocol import ErrorObject, ErrorResponse

EXPOSED_HEADERS = ["x-request-id"]  # so browser code can quote it in a bug report


class AllowedOrigins(CORSMiddleware):
    def __init__(self, app: ASGIApp, config: HTTPConfig) -> None:
        super().__init__(app, allow_origins=config.allowed_origins, allow_methods=config.allowed_methods,
                         allow_headers=config.allowed_headers, allow_credentials=config.allow_credentials,
                         expose_headers=EXPOSED_HEADERS)

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code < 400:
            return response
        reasons = bytes(response.body).decode()
        error = ErrorObject(message=f"CORS preflight refused: {reasons}", type="invalid_request_error")
        headers = {name: value for name, value in response.headers.items()
                   if name not in ("content-length", "content-type")}
        return JSONResponse(ErrorResponse(error=error).model_dump(), status_code=response.status_code,
                            headers=headers)
