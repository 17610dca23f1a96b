"""What the routers share: error responses for the OpenAPI document, paging parameters."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Query

from app.dependencies import get_settings
from app.errors import ErrorResponse
from app.settings import Settings


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for the error codes an endpoint can answer."""
    described = {
        401: "No API key, or an unknown or revoked one.",
        403: "The API key lacks the scope this endpoint needs.",
        404: "No such resource for this tenant.",
        409: "The resource's state does not allow this.",
        413: "The body is larger than the configured limit.",
        422: "The request is invalid; the error names each field and its problem.",
        429: "A limit that frees up by itself was reached; retry after Retry-After seconds.",
    }
    responses: dict[int | str, dict[str, Any]] = {
        code: {"model": ErrorResponse, "description": described[code]} for code in codes
    }
    if 429 in responses:
        responses[429]["headers"] = {
            "Retry-After": {"description": "Seconds to wait.", "schema": {"type": "integer"}}
        }
    return responses


AUTH_ERRORS = (401, 403)


class Paging:
    def __init__(self, page_size: int, page_token: str | None) -> None:
        self.page_size = page_size
        self.page_token = page_token


async def paging(
    settings: Annotated[Settings, Depends(get_settings)],
    page_size: Annotated[
        int | None, Query(ge=1, description="Items per page (capped by the server).")
    ] = None,
    page_token: Annotated[
        str | None, Query(max_length=500, description="next_page_token of the previous page.")
    ] = None,
) -> Paging:
    size = min(page_size or settings.page_size_default, settings.page_size_max)
    return Paging(size, page_token)


PagingDep = Annotated[Paging, Depends(paging)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
