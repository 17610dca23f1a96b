"""The options every client command shares, and the one place that turns a ServiceError into
one line on stderr and a non-zero exit."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import click

from negmerge_client.cli.config import resolve
from negmerge_client.client import ServiceClient, ServiceError


def with_service(command: Callable[..., Any]) -> Callable[..., Any]:
    """Adds --api-url, --api-key and --request-timeout, and calls `command(service, ...)` with a
    ServiceClient for them. Put it right above the function, below the click decorators."""

    @click.option(
        "--api-url",
        metavar="URL",
        help="The service (default: $NEGMERGE_API_URL, the config file, http://127.0.0.1:8000).",
    )
    @click.option(
        "--api-key",
        metavar="KEY",
        help="API key (default: $NEGMERGE_API_KEY, then the config file).",
    )
    @click.option(
        "--request-timeout", type=float, metavar="SECONDS", help="Seconds to wait for a response."
    )
    @functools.wraps(command)
    def run(
        api_url: str | None, api_key: str | None, request_timeout: float | None, **kwargs: Any
    ) -> Any:
        connection = resolve(api_url, api_key, request_timeout)
        with ServiceClient(connection.api_url, connection.api_key, connection.timeout) as service:
            try:
                return command(service, **kwargs)
            except ServiceError as exc:
                raise click.ClickException(str(exc)) from None

    return run
