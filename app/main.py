"""The FastAPI application: `uvicorn app.main:app` (or create_app(settings) in tests)."""

from __future__ import annotations

import gc
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline
from prometheus_client import CollectorRegistry

from app.api import ROUTERS
from app.api.common import document_common_errors
from app.artifacts import store_for
from app.dashboard import ROUTERS as DASHBOARD_ROUTERS
from app.db.repositories import (
    count_jobs_by_state,
    fine_tuning_device_usage,
    fine_tuning_throughput,
)
from app.db.session import Database
from app.errors import install_error_handlers
from app.limits import BodyLimitMiddleware
from app.observability import (
    FineTuningDeviceUsage,
    FineTuningThroughput,
    JobsByState,
    RequestContextMiddleware,
    configure_logging,
)
from app.queue import JobQueue
from app.settings import Settings, get_settings

DESCRIPTION = """
Make a trained image model forget data: a deletion request becomes a long-running
**unlearning job** (NegMerge, arXiv 2410.05583). Register a model and a data set, submit a
job naming what to forget, poll it, and file its evidence report.

Authenticate with an API key: `Authorization: Bearer <key>` or `X-API-Key: <key>`.
Errors are JSON: `{"error": {"code", "message", "fields": [{"field", "problem"}]}}`.
"""

# Where the docs pages' assets (Swagger UI, ReDoc) are served from.
DOCS_STATIC_URL = "/docs-static"


def create_app(settings: Settings | None = None) -> FastAPI:
    """The app for `settings` (default: from the environment), with its database and queue."""
    settings = settings or get_settings()
    database = Database(settings.database_url, settings.db_pool_size, settings.db_read_pool_size)
    queue = JobQueue(settings)
    store_for(settings)  # an s3:// store's endpoint and keys become this process's defaults

    @asynccontextmanager
    async def lifespan(_app: FastAPI):  # type: ignore[no-untyped-def]
        # Everything imported so far (hundreds of thousands of objects, without torch: the
        # job schema is negmerge.job_spec) lives as long as the process: keep it out of the
        # cyclic collector's full passes, which would stall every request in flight.
        gc.freeze()
        yield
        queue.close()
        await database.aclose()
        database.dispose()

    # /docs and /redoc load their scripts and styles from the installed fastapi-offline
    # package, not a CDN, so they work on a machine without internet; no validator badge
    # (Swagger UI would fetch it from validator.swagger.io).
    app = FastAPIOffline(
        title="NegMerge Service",
        version="1.0.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        static_url=DOCS_STATIC_URL,
        swagger_ui_parameters={"validatorUrl": None},
    )
    app.state.settings = settings
    app.state.db = database
    app.state.queue = queue

    def count() -> dict[str, int]:
        with database.unit_of_work() as session:
            return count_jobs_by_state(session)

    def throughput() -> float:
        with database.unit_of_work() as session:
            return fine_tuning_throughput(session)

    def device_usage() -> list[dict[str, float]]:
        with database.unit_of_work() as session:
            return fine_tuning_device_usage(session)

    app.state.metrics_registry = CollectorRegistry(auto_describe=False)
    if settings.metrics_job_counts:
        app.state.metrics_registry.register(JobsByState(count))
    app.state.metrics_registry.register(FineTuningThroughput(throughput))
    app.state.metrics_registry.register(FineTuningDeviceUsage(device_usage))

    install_error_handlers(app)
    app.add_middleware(
        BodyLimitMiddleware,
        max_bytes=settings.max_body_bytes,
        upload_max_bytes=settings.max_upload_bytes,
    )
    app.add_middleware(RequestContextMiddleware)
    for router in ROUTERS:
        app.include_router(router)
    for router in DASHBOARD_ROUTERS:  # HTML pages under /dashboard, not in the OpenAPI document
        app.include_router(router)
    document_common_errors(app)
    return app


def _default_app() -> FastAPI:
    configure_logging(get_settings().log_level)
    return create_app()


def __getattr__(name: str) -> FastAPI:
    # `uvicorn app.main:app` builds the app on first use, so importing this module (tests,
    # tools) does not connect to anything.
    if name == "app":
        globals()["app"] = application = _default_app()
        return application
    raise AttributeError(name)
