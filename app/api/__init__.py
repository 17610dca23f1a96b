"""The HTTP endpoints, one router per resource (each carries its full /v1/... prefix, so the
route templates in metrics and logs are the public paths)."""

from app.api import audit, datasets, health, jobs, models

ROUTERS = [health.router, models.router, datasets.router, jobs.router, audit.router]

__all__ = ["ROUTERS"]
