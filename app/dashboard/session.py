"""Signing in to the dashboard with an API key, and keeping its forms safe from CSRF.

The key is checked as the REST API checks it (its sha256 looked up through the same cache,
revoked keys refused) and kept in an HttpOnly, SameSite=Strict cookie scoped to /dashboard:
page scripts cannot read it, other sites cannot make the browser send it, and the REST API
never sees it. State-changing forms also carry a token derived from the key, which nobody
without the key can compute, and must come from this origin.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Annotated
from urllib.parse import urlsplit

from fastapi import Depends, Request
from fastapi.responses import Response

from app.auth import JOB_READERS, Principal, principal_for_key
from app.dependencies import DbSession
from app.errors import Forbidden

COOKIE = "negmerge_dashboard_key"
COOKIE_PATH = "/dashboard"
SESSION_SECONDS = 12 * 3600
READ_SCOPES = frozenset(JOB_READERS)
HOME = "/dashboard/jobs"
SIGN_IN = "/dashboard/sign-in"


class SignInRequired(Exception):
    """No valid key in the cookie; pages answer with a redirect to the sign-in form."""

    def __init__(self, next_url: str) -> None:
        super().__init__(next_url)
        self.next_url = next_url


@dataclass(frozen=True)
class Viewer:
    """The signed-in caller and the CSRF token of their session."""

    principal: Principal
    csrf_token: str

    @property
    def can_cancel(self) -> bool:
        return "jobs:write" in self.principal.scopes

    @property
    def can_read_audit(self) -> bool:
        return "audit:read" in self.principal.scopes


def csrf_token_for(key: str) -> str:
    return hmac.new(key.encode(), b"negmerge-dashboard-csrf", hashlib.sha256).hexdigest()


def may_use_dashboard(principal: Principal) -> bool:
    return bool(principal.scopes & READ_SCOPES)


def current_viewer(request: Request, session: DbSession) -> Viewer:
    """The signed-in caller; raises SignInRequired without a valid key of enough scope."""
    key = request.cookies.get(COOKIE)
    principal = principal_for_key(session, key) if key else None
    if principal is None or not may_use_dashboard(principal):
        query = request.url.query
        raise SignInRequired(request.url.path + (f"?{query}" if query else ""))
    request.state.principal = principal  # the access log names the caller
    return Viewer(principal, csrf_token_for(key or ""))


ViewerDep = Annotated[Viewer, Depends(current_viewer)]


def keep_key(request: Request, response: Response, key: str) -> None:
    response.set_cookie(
        COOKIE,
        key,
        max_age=SESSION_SECONDS,
        path=COOKIE_PATH,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )


def forget_key(request: Request, response: Response) -> None:
    response.delete_cookie(
        COOKIE,
        path=COOKIE_PATH,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )


def check_same_origin(request: Request) -> None:
    """Refuse a form posted from another site: its Origin (or, without one, its Referer) must
    name this host. Host is compared without the scheme, so a TLS-terminating proxy in front
    of the service does not break it."""
    source = request.headers.get("origin") or request.headers.get("referer")
    if source is None:
        return  # old clients send neither; the CSRF token still has to match
    if source == "null" or urlsplit(source).netloc != request.headers.get("host"):
        raise Forbidden("this form was sent from another site")


def check_form(request: Request, viewer: Viewer, token: str) -> None:
    """CSRF checks for a state-changing form of a signed-in caller."""
    check_same_origin(request)
    if not hmac.compare_digest(token.encode(), viewer.csrf_token.encode()):
        raise Forbidden("this form has expired or was not sent from the dashboard; reload it")


def safe_next(next_url: str | None) -> str:
    """Where to go after signing in: only a dashboard path (never another site)."""
    if (
        next_url
        and next_url.startswith("/dashboard")
        and not next_url.startswith("//")
        and "\\" not in next_url
        and not urlsplit(next_url).netloc
    ):
        return next_url
    return HOME
