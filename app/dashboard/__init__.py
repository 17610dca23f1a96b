"""The compliance dashboard: server-rendered pages under /dashboard for people who review
deletion requests (jobs, their evidence and their audit trail), signed in with an API key.

Templates and static files ship inside this package and nothing is loaded from elsewhere,
so the dashboard works offline.
"""

from app.dashboard.routes import data, pages

# Not part of the REST API: kept out of the OpenAPI document.
ROUTERS = [data, pages]

__all__ = ["ROUTERS"]
