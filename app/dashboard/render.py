"""Templates, the two static files, and the headers every dashboard response carries."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.resources import files
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse
from jinja2 import Environment, PackageLoader, StrictUndefined

from app.dashboard.views import outcome

# Every page polls at this pace while a job on it has not ended.
POLL_MS = 2500

# Nothing but this origin's own files: no inline script, no CDN, no framing.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",  # pages show tenant data
}


@dataclass(frozen=True)
class Asset:
    body: bytes
    media_type: str
    version: str  # part of its URL, so a new release is never served from a stale cache


def _load_assets() -> dict[str, Asset]:
    static = files("app.dashboard") / "static"
    assets = {}
    for name, media_type in (
        ("dashboard.css", "text/css; charset=utf-8"),
        ("dashboard.js", "text/javascript; charset=utf-8"),
    ):
        body = (static / name).read_bytes()
        assets[name] = Asset(body, media_type, hashlib.sha256(body).hexdigest()[:12])
    return assets


ASSETS = _load_assets()


def asset_url(name: str) -> str:
    return f"/dashboard/static/{name}?v={ASSETS[name].version}"


def when(moment: datetime | None) -> str:
    """A time as people read it, in UTC (the times the API reports)."""
    if moment is None:
        return "—"
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def iso(moment: datetime | None) -> str:
    if moment is None:
        return ""
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).isoformat()


def number(value: Any, digits: int = 2) -> str:
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        return "—"
    return f"{value:.{digits}f}"


def signed(value: Any, digits: int = 2) -> str:
    if not isinstance(value, int | float) or not math.isfinite(value):
        return "—"
    return f"{value:+.{digits}f}".replace("-", "−")


def compact_json(value: Any) -> str:
    # A plain string, not Markup: autoescaping applies to it like to any other text.
    return json.dumps(value, sort_keys=True, separators=(", ", ": "), default=str)


environment = Environment(
    loader=PackageLoader("app.dashboard", "templates"),
    autoescape=True,  # every template, whatever its name
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
environment.filters.update(
    when=when, iso=iso, number=number, signed=signed, compact_json=compact_json
)
environment.globals.update(asset_url=asset_url, poll_ms=POLL_MS, outcome=outcome)


def render(request: Request, template: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    context.setdefault("viewer", None)
    html = environment.get_template(template).render(request=request, **context)
    return HTMLResponse(html, status_code=status_code, headers=SECURITY_HEADERS)


def error_page(request: Request, status_code: int, message: str) -> HTMLResponse:
    titles = {403: "Not allowed", 404: "Not found", 409: "Not possible now"}
    return render(
        request,
        "error.html",
        status_code,
        title=titles.get(status_code, "Something went wrong"),
        message=message,
        code=status_code,
    )
