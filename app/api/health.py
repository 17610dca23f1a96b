"""Operations: liveness, readiness, and Prometheus metrics (outside /v1, no API key)."""

from __future__ import annotations

import hmac
import logging

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field
from sqlalchemy import text

from app.api.common import errors
from app.errors import Unauthenticated
from app.observability import REGISTRY

router = APIRouter(tags=["operations"])
log = logging.getLogger(__name__)


class Health(BaseModel):
    status: str = Field(examples=["ok"])
    checks: dict[str, str] = Field(
        default_factory=dict, examples=[{"database": "ok", "broker": "ok"}]
    )


@router.get("/healthz", response_model=Health, summary="Liveness: the process answers")
def healthz() -> Health:
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Health,
    responses={503: {"model": Health, "description": "The database or the broker is down."}},
    summary="Readiness: the database and the broker are reachable",
)
def readyz(request: Request) -> Response:
    checks: dict[str, str] = {}
    try:
        with request.app.state.db.engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:  # any failure means not ready; say which
        log.warning("database not reachable: %s", exc)
        checks["database"] = f"unreachable: {type(exc).__name__}"
    try:
        request.app.state.queue.ping()
        checks["broker"] = "ok"
    except Exception as exc:
        log.warning("broker not reachable: %s", exc)
        checks["broker"] = f"unreachable: {type(exc).__name__}"
    ok = all(value == "ok" for value in checks.values())
    body = Health(status="ok" if ok else "unavailable", checks=checks)
    return JSONResponse(body.model_dump(), status_code=200 if ok else 503)


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {
            "content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}},
            "description": "Prometheus text format.",
        },
        **errors(401),
    },
    summary="Prometheus metrics",
    description="Open, unless the operator sets NEGMERGE_METRICS_TOKEN: then only "
    "`Authorization: Bearer <token>` is answered. Job counts by state (all tenants together) "
    "are shown unless NEGMERGE_METRICS_JOB_COUNTS is false.",
)
def metrics(request: Request) -> Response:
    token = request.app.state.settings.metrics_token
    if token is not None:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        expected = token.get_secret_value().encode()
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), expected):
            raise Unauthenticated("/metrics needs Authorization: Bearer <the metrics token>")
    body = generate_latest(REGISTRY) + generate_latest(request.app.state.metrics_registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
