"""Shapes shared by the resources."""

from __future__ import annotations

from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

Item = TypeVar("Item")


class Strict(BaseModel):
    """A request body: unknown fields are an error, not silently dropped, and no text may
    hold a NUL character (PostgreSQL cannot store one)."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _no_nul(cls, data: Any) -> Any:
        if (where := find_nul(data)) is not None:
            raise ValueError(f"{where or 'value'}: text must not contain a NUL character")
        return data


def find_nul(value: Any, path: str = "") -> str | None:
    """The dotted path of the first string (or key) in `value` holding a NUL character."""
    if isinstance(value, str):
        return path if "\x00" in value else None
    if isinstance(value, dict):
        for key, item in value.items():
            where = f"{path}.{key}" if path else str(key)
            if "\x00" in str(key):
                return where
            if (found := find_nul(item, where)) is not None:
                return found
    if isinstance(value, list):
        for index, item in enumerate(value):
            if (found := find_nul(item, f"{path}.{index}" if path else str(index))) is not None:
                return found
    return None


class ListResponse(BaseModel, Generic[Item]):
    items: list[Item]
    next_page_token: str | None = Field(
        None, description="Pass as page_token for the next page; absent on the last page."
    )
