"""The bases of the API's bodies: strict request models, and deltas that leave out what did not change."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, model_serializer


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

