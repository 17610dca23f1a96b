"""Shapes shared by the resources."""

from __future__ import annotations

import math
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

Item = TypeVar("Item")


class Strict(BaseModel):
    """A request body: unknown fields are an error, not silently dropped, and nothing in it
    may be what cannot be stored or computed with: text holding a NUL character (PostgreSQL
    cannot store one) or a number that is not finite (NaN, Infinity, or 1e309, which JSON
    parsing turns into infinity), wherever it is, typed fields and free-form ones alike."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _storable(cls, data: Any) -> Any:
        if (found := find_unstorable(data)) is not None:
            where, problem = found
            raise ValueError(f"{where or 'value'}: {problem}")
        return data


_NUL = "text must not contain a NUL character"


def find_unstorable(value: Any, path: str = "") -> tuple[str, str] | None:
    """The dotted path of the first string (or key) holding a NUL character or float that is
    not finite in `value`, and the problem; None if there is none."""
    if isinstance(value, str):
        return (path, _NUL) if "\x00" in value else None
    if isinstance(value, float):
        return None if math.isfinite(value) else (path, f"must be a finite number, not {value}")
    if isinstance(value, dict):
        for key, item in value.items():
            where = f"{path}.{key}" if path else str(key)
            if "\x00" in str(key):
                return where, _NUL
            if (found := find_unstorable(item, where)) is not None:
                return found
    if isinstance(value, list):
        for index, item in enumerate(value):
            found = find_unstorable(item, f"{path}.{index}" if path else str(index))
            if found is not None:
                return found
    return None


class ListResponse(BaseModel, Generic[Item]):
    items: list[Item]
    next_page_token: str | None = Field(
        None, description="Pass as page_token for the next page; absent on the last page."
    )
