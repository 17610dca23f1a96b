"""The NegMerge service's client: ServiceClient for Python, `negmerge-client` for a terminal.
It talks to the REST API over HTTP and needs nothing of the server installed."""

from negmerge_client.client import (
    DEFAULT_API_URL,
    JSON,
    TERMINAL_STATES,
    ServiceClient,
    ServiceError,
)

__all__ = ["DEFAULT_API_URL", "JSON", "TERMINAL_STATES", "ServiceClient", "ServiceError"]
