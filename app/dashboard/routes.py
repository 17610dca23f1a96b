"""The dashboard's routes: HTML pages (`pages`) and the small JSON and static files their
script and stylesheet come from (`data`)."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Coroutine
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Form, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.routing import APIRoute

from app.auth import principal_for_key
from app.dashboard import views
from app.dashboard.charts import lambda_curve_chart
from app.dashboard.render import ASSETS, SECURITY_HEADERS, error_page, render
from app.dashboard.session import (
    HOME,
    SIGN_IN,
    SignInRequired,
    ViewerDep,
    check_form,
    check_same_origin,
    forget_key,
    keep_key,
    may_use_dashboard,
    safe_next,
)
from app.db.deletion_repositories import DeletionRequestFilter, DeletionRequestRepository
from app.db.models import JobState, UnlearningJob
from app.db.repositories import (
    AuditRepository,
    InvalidPageToken,
    JobRepository,
    ModelRepository,
)
from app.dependencies import DbSession
from app.errors import ApiError, Forbidden, NotFound, Unauthenticated
from app.schemas.results import JobResult
from app.services import deletion_requests, job_states, reports
from app.services.report_signing import signer_for

AUDIT_ENTRIES_SHOWN = 200
MODELS_IN_FILTER = 200
STATUS_IDS_MAX = 200

Handler = Callable[[Request], Coroutine[Any, Any, Response]]


class PageRoute(APIRoute):
    """A page: without a sign-in it redirects to the form; errors are HTML pages."""

    def get_route_handler(self) -> Handler:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except SignInRequired as exc:
                return RedirectResponse(
                    f"{SIGN_IN}?{urlencode({'next': exc.next_url})}", status_code=303
                )
            except ApiError as exc:
                return error_page(request, exc.status_code, exc.message)
            except RequestValidationError:
                return error_page(request, 422, "The form was incomplete; please send it again.")

        return route


class DataRoute(APIRoute):
    """JSON for the pages' script: without a sign-in it answers 401 like the REST API."""

    def get_route_handler(self) -> Handler:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except SignInRequired:
                return Unauthenticated("sign in to the dashboard first").response()

        return route


pages = APIRouter(prefix="/dashboard", route_class=PageRoute, include_in_schema=False)
data = APIRouter(prefix="/dashboard", route_class=DataRoute, include_in_schema=False)


def _job_id(raw: str) -> uuid.UUID:
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise NotFound(f"unlearning job {raw} not found") from None


def _request_id(raw: str) -> uuid.UUID:
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise NotFound(f"deletion request {raw} not found") from None


# ---- signing in and out ----------------------------------------------------------------------


@pages.get("")
def home() -> RedirectResponse:
    return RedirectResponse(HOME, status_code=303)


@pages.get("/sign-in")
def sign_in_form(request: Request, next: Annotated[str | None, Query()] = None) -> Response:
    return render(request, "sign_in.html", next=safe_next(next), problem=None)


@pages.post("/sign-in")
def sign_in(
    request: Request,
    session: DbSession,
    api_key: Annotated[str, Form(max_length=200)] = "",
    next: Annotated[str, Form(max_length=2000)] = HOME,
) -> Response:
    check_same_origin(request)
    key = api_key.strip()
    principal = principal_for_key(session, key) if key else None
    if principal is None:
        problem, status = "Unknown or revoked API key.", 401
    elif not may_use_dashboard(principal):
        problem, status = "This API key lacks the jobs:read or audit:read scope.", 403
    else:
        response = RedirectResponse(safe_next(next), status_code=303)
        keep_key(request, response, key)
        return response
    return render(request, "sign_in.html", status, next=safe_next(next), problem=problem)


@pages.post("/sign-out")
def sign_out(
    request: Request, viewer: ViewerDep, csrf_token: Annotated[str, Form()] = ""
) -> Response:
    check_form(request, viewer, csrf_token)
    response = RedirectResponse(SIGN_IN, status_code=303)
    forget_key(request, response)
    return response


# ---- jobs ------------------------------------------------------------------------------------


@pages.get("/jobs")
def job_list(request: Request, viewer: ViewerDep, session: DbSession) -> Response:
    query = views.parse_list_query(request.query_params)
    settings = request.app.state.settings
    tenant = viewer.principal.tenant_id
    problems = list(query.problems)
    try:
        page = JobRepository(session, tenant).page(
            query.where, settings.page_size_default, query.page_token
        )
    except InvalidPageToken:
        problems.append("That page link is no longer valid; showing the first page.")
        page = JobRepository(session, tenant).page(query.where, settings.page_size_default, None)
    models = ModelRepository(session, tenant).page(MODELS_IN_FILTER, None).items
    return render(
        request,
        "jobs.html",
        viewer=viewer,
        jobs=page.items,
        next_url=query.page_url(page.next_page_token) if page.next_page_token else None,
        form=query.form,
        problems=problems,
        states=[s.value for s in JobState],
        models=models,
        model_names={m.id: m.name for m in models},
        filtered=any(query.form[k] for k in query.form),
    )


@pages.get("/jobs/{job_id}")
def job_page(request: Request, job_id: str, viewer: ViewerDep, session: DbSession) -> Response:
    tenant = viewer.principal.tenant_id
    report = reports.build_report(session, tenant, _job_id(job_id))
    job = job_states.get_job(session, tenant, report.job_id)
    result = JobResult.of(job.result) or JobResult()  # an unfinished job's: empty
    audit, more_audit = [], False
    if viewer.can_read_audit:
        audit, more_audit = _audit_trail(session, job)
    return render(
        request,
        "job.html",
        viewer=viewer,
        job=job,
        report=report,
        forgot=views.forgot(job),
        result=result,
        chart=lambda_curve_chart(
            [p.model_dump(by_alias=True) for p in result.lambda_curve],
            result.lambda_,
            views.retain_ratio(job),
        ),
        curve=result.lambda_curve,
        metrics=views.metric_rows(result),
        verdict=result.verdict,
        audit=audit,
        more_audit=more_audit,
        requests=views.request_rows(
            session, tenant, DeletionRequestRepository(session, tenant).of_job(job.id)
        ),
        deletion=views.deletion_status(job),
    )


def _audit_trail(session: DbSession, job: UnlearningJob) -> tuple[list[views.AuditRow], bool]:
    """Every entry of the tenant's chain from the job's first to the head at its end (the
    newest while it runs), oldest first: seq has no gaps, so nothing reads as deleted. Rows
    in between about other things (another job's steps) are shown too, marked."""
    repo = AuditRepository(session, job.tenant_id)
    first = repo.first_seq_of("unlearning_job", str(job.id))
    if first is None:
        return [], False
    entries = repo.seq_range(first, job.audit_seq_at_end, AUDIT_ENTRIES_SHOWN + 1)
    rows = [views.AuditRow(e, views.concerns_job(e, job.id)) for e in entries]
    return rows[:AUDIT_ENTRIES_SHOWN], len(rows) > AUDIT_ENTRIES_SHOWN


# ---- deletion requests -----------------------------------------------------------------------


@pages.get("/requests")
def request_list(
    request: Request,
    viewer: ViewerDep,
    session: DbSession,
    page_token: Annotated[str | None, Query(max_length=2000)] = None,
) -> Response:
    tenant = viewer.principal.tenant_id
    repo = DeletionRequestRepository(session, tenant)
    size = request.app.state.settings.page_size_default
    problems = []
    try:
        page = repo.page(DeletionRequestFilter(), size, page_token or None)
    except InvalidPageToken:
        problems.append("That page link is no longer valid; showing the first page.")
        page = repo.page(DeletionRequestFilter(), size, None)
    next_url = None
    if page.next_page_token:
        next_url = "/dashboard/requests?" + urlencode({"page_token": page.next_page_token})
    return render(
        request,
        "requests.html",
        viewer=viewer,
        rows=views.request_rows(session, tenant, page.items),
        next_url=next_url,
        problems=problems,
    )


@pages.get("/requests/{request_id}")
def request_page(
    request: Request, request_id: str, viewer: ViewerDep, session: DbSession
) -> Response:
    tenant = viewer.principal.tenant_id
    found = deletion_requests.get_request(session, tenant, _request_id(request_id))
    [row] = views.request_rows(session, tenant, [found])
    model = ModelRepository(session, tenant).get(found.model_id)
    return render(
        request,
        "request.html",
        viewer=viewer,
        row=row,
        model_name=model.name if model else str(found.model_id),
    )


@pages.post("/jobs/{job_id}/cancel")
def cancel(
    request: Request,
    job_id: str,
    viewer: ViewerDep,
    session: DbSession,
    csrf_token: Annotated[str, Form()] = "",
) -> Response:
    check_form(request, viewer, csrf_token)
    if not viewer.can_cancel:
        raise Forbidden("this API key lacks the scope jobs:write: it can only read")
    job = job_states.cancel_job(session, viewer.principal, _job_id(job_id))
    return RedirectResponse(f"/dashboard/jobs/{job.id}", status_code=303)


# ---- data for the pages' script, and the static files ----------------------------------------


@data.get("/jobs.json")
def job_status(
    viewer: ViewerDep,
    session: DbSession,
    ids: Annotated[list[str] | None, Query(alias="id", max_length=64)] = None,
) -> JSONResponse:
    """The live state of the given jobs of the caller's tenant (unknown ids are left out)."""
    repo = JobRepository(session, viewer.principal.tenant_id)
    found = []
    for raw in list(dict.fromkeys(ids or []))[:STATUS_IDS_MAX]:
        try:
            job = repo.get(uuid.UUID(raw))
        except ValueError:
            continue
        if job is not None:
            found.append(views.live_status(job))
    return JSONResponse({"jobs": found}, headers={"Cache-Control": "no-store"})


@data.get("/jobs/{job_id}/report.json")
def report(request: Request, job_id: str, viewer: ViewerDep, session: DbSession) -> Response:
    """The job's signed evidence report, as GET /v1/unlearning-jobs/{id}/report gives it."""
    settings = request.app.state.settings
    try:
        body = reports.signed_report(
            session,
            viewer.principal.tenant_id,
            _job_id(job_id),
            signer_for(settings.report_signing_key_file),
        )
    except ApiError as exc:
        return exc.response()
    return Response(
        body,
        media_type="application/json",
        headers={"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"},
    )


@data.get("/static/{name}")
def static(name: str) -> Response:
    asset = ASSETS.get(name)
    if asset is None:
        return Response(status_code=404)
    # The URL names the file's version, so it may be kept for long.
    headers = {**SECURITY_HEADERS, "Cache-Control": "public, max-age=31536000, immutable"}
    return Response(asset.body, media_type=asset.media_type, headers=headers)
