"""Why the engine refused or failed a request; the HTTP layer maps each to its status code."""


class EngineError(Exception):
    """Base class. ``param`` names the request field at fault, when one is."""

    status = 500
    type = "internal_error"

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class RequestRejected(EngineError):
    """The request can never be served as asked (too long for the context or the KV pool, bad value)."""

    status = 400
    type = "invalid_request_error"


class QueueFull(EngineError):
    """More requests wait than --max-queue allows; the client should retry later."""

    status = 429
    type = "rate_limit_error"


class EngineUnavailable(EngineError):
    """The engine is stopping, stopped, or its worker failed."""

    status = 503
    type = "service_unavailable"
