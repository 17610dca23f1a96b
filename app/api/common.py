"""What the routers share: error responses for the OpenAPI document, paging parameters and
the page query."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, TypeVar

from fastapi import Depends, FastAPI, Query

from app.db.repositories import InvalidPageToken, Page
from app.dependencies import get_settings
from app.errors import ErrorResponse, InvalidRequest
from app.settings import Settings

Row = TypeVar("Row")


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for the error codes an endpoint can answer."""
    described = {
        401: "No API key, or an unknown or revoked one.",
        403: "The API key lacks the scope this endpoint needs.",
        404: "No such resource for this tenant.",
        409: "The resource's state does not allow this.",
        413: "The body is larger than the configured limit, or what the tenant stores would "
        "pass its quota of bytes.",
        422: "The request is invalid; the error names each field and its problem.",
        429: "A limit that frees up by itself was reached (concurrent uploads, a tenant's "
        "active jobs or daily compute); retry after Retry-After seconds.",
    }
    responses: dict[int | str, dict[str, Any]] = {
        code: {"model": ErrorResponse, "description": described[code]} for code in codes
    }
    if 429 in responses:
        responses[429]["headers"] = {
            "Retry-After": {"description": "Seconds to wait.", "schema": {"type": "integer"}}
        }
    return responses


_COMMON = {
    400: "The body cannot be read: not UTF-8, or a malformed multipart form.",
    415: "The body is not labelled JSON: send it with Content-Type: application/json.",
    503: "The database is unavailable (a dropped connection, a restart); nothing was "
    "changed: retry after Retry-After seconds.",
}


def document_common_errors(app: FastAPI) -> None:
    """Add the answers any route can give to `app`'s OpenAPI document: 400 where a body is
    read, 415 where it must be JSON, 503 where the database is used. As JSON, whatever the
    route's own media type."""
    generate = app.openapi
    schema = {"$ref": "#/components/schemas/ErrorResponse"}

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            for path, operations in generate()["paths"].items():  # the cached document
                for operation in operations.values():
                    body = operation.get("requestBody", {}).get("content", {})
                    codes = [400] if body else []
                    codes += [415] if "application/json" in body else []
                    codes += [503] if path.startswith("/v1/") or path == "/metrics" else []
                    for code in codes:
                        operation["responses"].setdefault(
                            str(code),
                            {
                                "description": _COMMON[code],
                                "content": {"application/json": {"schema": schema}},
                            },
                        )
        return app.openapi_schema  # type: ignore[return-value]

    app.openapi = openapi  # type: ignore[method-assign]


AUTH_ERRORS = (401, 403)


class Paging:
    def __init__(self, page_size: int, page_token: str | None) -> None:
        self.page_size = page_size
        self.page_token = page_token

    def page(self, fetch: Callable[[int, str | None], Page[Row]]) -> Page[Row]:
        """`fetch(page_size, page_token)` for this request: a repository's page query. A
        token this service did not hand out answers 422 on page_token."""
        try:
            return fetch(self.page_size, self.page_token)
        except InvalidPageToken as exc:
            raise InvalidRequest("page_token", exc.reason) from None


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
# Why a tenant deletes a data set or a model version: kept on the tombstone and in the audit.
DeletionReason = Annotated[str, Query(min_length=1, max_length=500, description="Why (recorded).")]
SettingsDep = Annotated[Settings, Depends(get_settings)]
