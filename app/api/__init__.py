"""The HTTP endpoints, one router per resource (each carries its full /v1/... prefix, so the
route templates in metrics and logs are the public paths)."""

from app.api import audit, datasets, events, health, jobs, models

ROUTERS = [
    health.router,
    models.router,
    datasets.router,
    jobs.router,
    events.router,
    audit.router,
]

__all__ = ["ROUTERS"]
