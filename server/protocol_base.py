"""The bases of the API's bodies: strict request models, and deltas that leave out what did not change."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, model_serializer


class Strict(BaseModel):
    """Request bodies: unknown fields refused, and no coercion (``true`` or ``"5"`` is not a token id or a count),
    so what is accepted is exactly what the OpenAPI schema describes."""

    model_config = ConfigDict(extra="forbid", strict=True)


class WithoutNulls(BaseModel):
    """A stream delta carries only what changed: unset fields stay out of the JSON."""

    @model_serializer(mode="wrap")
    def _without_nulls(self, handler) -> dict:
        return {key: value for key, value in handler(self).items() if value is not None}
