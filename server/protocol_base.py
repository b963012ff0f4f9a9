"""The bases of the API's bodies: strict request models, and deltas that leave out what did not change."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict, model_serializer


def _integral_number(value: object) -> object:
    """A float without a fractional part (``5.0``) as the int it equals; anything else for strict validation."""
    return int(value) if type(value) is float and value.is_integer() else value


# A request's integer: JSON Schema's "integer" is any number without a fractional part, so `5.0` is one (as
# vLLM reads it too); `true`, `"5"` and `5.5` are not. The validator goes after any bounds in an Annotated (and
# over the whole `int | None`), or pydantic writes the bounds into the JSON schema under their Python names.
INTEGRAL = BeforeValidator(_integral_number)
Integer = Annotated[int, INTEGRAL]
OptionalInteger = Annotated[int | None, INTEGRAL]


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

