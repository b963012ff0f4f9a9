"""vLLM's ``--middleware``: ASGI middleware a deployment brings, named by import path.

A class is added as ASGI middleware (``app.add_middleware``), an async function ``(request, call_next)`` as an HTTP
middleware (``@app.middleware("http")``), as vLLM does. They run inside the gateway: after the API key, the body
limits and the request id, so a request they see has been let in, and each answer they shape is still logged.
"""

from __future__ import annotations

import importlib
import inspect
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastapi import FastAPI


def imported_middleware(path: str) -> Any:
    """What ``path`` names, imported: a ValueError saying why when it cannot be used."""
    module_name, _, name = path.rpartition(".")
    try:
        found = getattr(importlib.import_module(module_name), name)
    except Exception as e:  # noqa: BLE001 - a missing module, a missing name, or the module's own error on import
        raise ValueError(f"--middleware {path!r} cannot be imported ({type(e).__name__}: {e})") from None
    if not (inspect.isclass(found) or inspect.iscoroutinefunction(found)):
        raise ValueError(f"--middleware {path!r} is neither a class (ASGI middleware) nor an async function "
                         "(request, call_next)")
    return found


def check_user_middleware(paths: tuple[str, ...]) -> None:
    for path in paths:
        imported_middleware(path)


def add_user_middleware(app: FastAPI, paths: tuple[str, ...]) -> None:
    """Each in the order given; as with any Starlette middleware, a later one wraps the earlier ones."""
    for path in paths:
        found = imported_middleware(path)
        if inspect.iscoroutinefunction(found):
            app.middleware("http")(found)
        else:
            app.add_middleware(found)
