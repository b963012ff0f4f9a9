"""A request body's validation failure as one OpenAI-style error, worded the way the client wrote the body.

pydantic reports a field typed as a union once per branch, each under a location like
``('stop', 'constrained-str')`` or ``('prompt', 'list[list[constrained-int]]', 0, 0)``. Those tags are pydantic's,
not the client's: the message names the parameter as written (``stop``, ``prompt[0][0]``) and, when no branch got
past the type check, says which types the parameter takes.
"""

from __future__ import annotations

import re

from fastapi.exceptions import RequestValidationError

from server.protocol import ErrorObject

_TYPE_WORDS = {"str": "string", "int": "integer", "float": "number", "bool": "boolean", "dict": "object"}
# Type names, our own tags (``chat-form``, ``user-message``, ``text-part``), and model names: no field is CamelCase.
_BRANCH_TAG = re.compile(r"[\[\]]|^(constrained-)?(str|int|float|bool|dict)$|^function-|-(form|message|part)$"
                         r"|^[A-Z][A-Za-z0-9]*$")


def validation_error_object(e: RequestValidationError) -> ErrorObject:
    """The most specific problem, named by its field (``param`` is the top-level body field)."""
    errors = e.errors()
    first = errors[0]
    if first["type"] == "json_invalid":
        return ErrorObject(message=f"the body is not valid JSON: {first.get('msg')}", type="invalid_request_error")
    location = _client_parts(first["loc"])  # a body-level union's branch tag comes first: skip it too
    param = str(location[0]) if location else None
    same_field = [error for error in errors if _field(error) == _field(first)]
    best = max(same_field, key=_specificity)
    path = _path(best["loc"])
    if best["type"] == "extra_forbidden":
        message = f"{path}: unknown or unsupported parameter{_in_role(best['loc'])}"
    elif len(branches := _branches(same_field, best)) > 1:  # no branch of the union took the value
        expected = " or ".join(dict.fromkeys(_describe(error["loc"][-1]) for error in branches))
        message = f"{path}: must be {expected}"
    else:
        message = f"{path or 'body'}: {best['msg']}"
    return ErrorObject(message=message, type="invalid_request_error", param=param)


def _field(error: dict) -> object:
    location = _client_parts(error["loc"])
    return location[0] if location else None


def _client_parts(loc: tuple) -> list[str | int]:
    return [part for part in loc if part != "body" and not _is_tag(part)]


def _path(loc: tuple) -> str:
    """``('body', 'prompt', 'list[list[constrained-int]]', 0, 0)`` -> ``prompt[0][0]``."""
    text = ""
    for part in _client_parts(loc):
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


def _in_role(loc: tuple) -> str:
    """`` for role 'user'`` when the field sits in a chat message: each role takes its own fields."""
    roles = [part.removesuffix("-message") for part in loc if isinstance(part, str) and part.endswith("-message")]
    return f" for role {roles[-1]!r}" if roles else ""


def _specificity(error: dict) -> tuple[bool, int, bool]:
    """A list too long or too short first (its items took that branch: 2,000 prompts are too many prompts, not
    a first prompt of the wrong type), then deeper (the value got further into that branch), then a broken
    bound over a wrong type."""
    return (error["type"] in ("too_long", "too_short"), len(_client_parts(error["loc"])),
            not error["type"].endswith("_type"))


def _branches(errors: list[dict], best: dict) -> list[dict]:
    """The type errors of a union's branches at ``best``'s place, when ``best`` is one: each location ends in
    its branch's tag (``('stop', 'constrained-str')``, ``('messages', 0, 'user-message', 'content', 'str')``)."""
    if _specificity(best)[2] or not _is_tag(best["loc"][-1]):
        return []
    return [error for error in errors if _path(error["loc"]) == _path(best["loc"]) and _is_tag(error["loc"][-1])]


def _is_tag(part: object) -> bool:
    return isinstance(part, str) and part != "body" and bool(_BRANCH_TAG.search(part))


def _describe(tag: str) -> str:
    """``list[constrained-str]`` -> ``a list of strings``; a validator's wrapper (an integer that takes ``5.0``:
    ``function-before[_integral_number(), constrained-int]``) is described by what it wraps."""
    wrapped = re.fullmatch(r"function-(?:before|after|wrap)\[[^\[\],]*, (.*)\]", tag)
    if wrapped:
        return _describe(wrapped.group(1))
    inner = re.fullmatch(r"list\[(.*)\]", tag)
    if inner:
        return "a list of " + _plural(_describe(inner.group(1)))
    model = tag[:1].isupper() or tag.startswith("tagged-union[")  # a model, or models told apart by a tag
    word = _TYPE_WORDS.get(tag.removeprefix("constrained-"), "object" if model else tag)
    return ("an " if word[0] in "aeiou" else "a ") + word


def _plural(described: str) -> str:
    noun = described.split(" ", 1)[1]  # drop "a"/"an"
    if noun.startswith("list of "):
        return "lists of " + noun.removeprefix("list of ")
    return noun + "s"
