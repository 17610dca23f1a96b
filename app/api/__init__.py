"""The HTTP endpoints, one router per resource (each carries its full /v1/... prefix, so the
route templates in metrics and logs are the public paths)."""

from app.api import (
    audit,
    datasets,
    deletion_requests,
    events,
    health,
    jobs,
    models,
    report_signing,
    webhooks,
)

ROUTERS = [
    health.router,
    models.router,
    datasets.router,
    jobs.router,
    report_signing.router,
    deletion_requests.router,
    events.router,
    webhooks.router,
    audit.router,
]

__all__ = ["ROUTERS"]
