"""The bases of the API's bodies: strict request models, and deltas that leave out what did not change."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, model_serializer
from pydantic_core import PydanticCustomError


class Strict(BaseModel):
    """Request bodies: unknown fields refused, no coercion (``true`` or ``"5"`` is not a token id or a count) and
    no NaN or infinity (which Python's JSON reader accepts), so what is accepted is exactly what the OpenAPI
    schema describes."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class WithoutNulls(BaseModel):
    """A stream delta carries only what changed: unset fields stay out of the JSON."""

    @model_serializer(mode="wrap")
    def _without_nulls(self, handler) -> dict:
        return {key: value for key, value in handler(self).items() if value is not None}


def _only_booleans(value: Any) -> Any:
    if not isinstance(value, bool):
        raise PydanticCustomError("bool_type", "Input should be a valid boolean")
    return value


# A boolean field with one allowed value: pydantic's Literal[True] takes 1 (and Literal[False] 0), strict or not.
OnlyTrue = Annotated[Literal[True], BeforeValidator(_only_booleans)]
OnlyFalse = Annotated[Literal[False], BeforeValidator(_only_booleans)]
