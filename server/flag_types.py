"""What each flag's value must be: argparse ``type=`` functions, each refusing a bad value with a message that says
what a good one looks like (argparse names the flag, or the GPTSERVE_ variable it came from)."""

from __future__ import annotations

import argparse
import json
import re
from typing import Any

ORIGIN = re.compile(r"[a-z][a-z0-9+.-]*://[^/\s]+")  # scheme://host[:port], as a browser sends it in Origin
METHOD = re.compile(r"[A-Z]+")
HEADER = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+")  # an HTTP token, as header names are


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _listed(text: str) -> list[str]:
    """vLLM's JSON list ('["a", "b"]'), or one value, or a comma-separated list (how the environment gives
    several)."""
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a JSON list: {text!r}") from None
        if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
            raise argparse.ArgumentTypeError(f"must be a JSON list of strings, got {text!r}")
        return [item.strip() for item in items if item.strip()]
    return [part.strip() for part in text.split(",") if part.strip()]


def origins(text: str) -> list[str]:
    origins = _listed(text)
    for origin in origins:
        if origin != "*" and not ORIGIN.fullmatch(origin):
            raise argparse.ArgumentTypeError(f"{origin!r} is not an exact origin like https://app.example.com:8443 "
                                             "(or *, any origin)")
    return origins


def methods(text: str) -> list[str]:
    methods = [method.upper() for method in _listed(text)]
    for method in methods:
        if method != "*" and not METHOD.fullmatch(method):
            raise argparse.ArgumentTypeError(f"{method!r} is not an HTTP method")
    return methods


def headers(text: str) -> list[str]:
    headers = _listed(text)
    for header in headers:
        if not HEADER.fullmatch(header):
            raise argparse.ArgumentTypeError(f"{header!r} is not a header name (or *, any)")
    return headers


def url_paths(text: str) -> tuple[str, ...]:
    paths = tuple(path.strip().rstrip("/") or "/" for path in text.split(",") if path.strip())
    for path in paths:
        if not path.startswith("/"):
            raise argparse.ArgumentTypeError(f"{path!r} is not a path like /health")
    return paths


def import_path(text: str) -> str:
    """module.name, as Python would import it (whether it imports is checked at the start)."""
    if not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not an import path like package.module.Name")
    return text


def api_key(text: str) -> str:
    """A key a client can send: not empty (which would silently leave the API open), no white space."""
    if not text or any(c.isspace() for c in text):
        raise argparse.ArgumentTypeError("an API key must be non-empty, without white space")
    return text


def non_empty(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def fraction(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def max_logprobs(text: str) -> int:
    value = int(text)
    if value < -1:
        raise argparse.ArgumentTypeError(f"must be -1 (the vocabulary) or >= 0, got {value}")
    return value


def root_path(text: str) -> str:
    """A path prefix: "" or "/a/b", without a trailing slash."""
    path = text.rstrip("/")
    if path and (not path.startswith("/") or any(c in path for c in "?# \t")):
        raise argparse.ArgumentTypeError(f"{text!r} is not a path prefix like /llm")
    return path


def generation_overrides(text: str) -> dict[str, Any]:
    from server.generation_defaults import parse_overrides

    try:
        return parse_overrides(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def template_kwargs(text: str) -> dict[str, Any]:
    from server.protocol import RESERVED_TEMPLATE_VARIABLES

    try:
        kwargs = json.loads(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not JSON: {text!r}") from None
    if not isinstance(kwargs, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object of template variables, got {text!r}")
    reserved = sorted(set(kwargs) & set(RESERVED_TEMPLATE_VARIABLES))
    if reserved:
        raise argparse.ArgumentTypeError(f"{', '.join(reserved)} come from each request, not from defaults")
    return kwargs
