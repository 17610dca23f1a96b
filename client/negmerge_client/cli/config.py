"""Where the client commands find the service, and `negmerge-client config`.

Precedence: the --api-url / --api-key flags, then NEGMERGE_API_URL / NEGMERGE_API_KEY, then
the TOML file at $NEGMERGE_CONFIG or ~/.config/negmerge/config.toml, then the default URL.
"""

from __future__ import annotations

import json
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from negmerge_client.client import DEFAULT_API_URL

KEYS = {
    "api_url": "The service's base URL, e.g. https://negmerge.example.com.",
    "api_key": "An API key (nmk_...).",
    "request_timeout": "Seconds to wait for one response.",
}
ENV = {
    "api_url": "NEGMERGE_API_URL",
    "api_key": "NEGMERGE_API_KEY",
    "request_timeout": "NEGMERGE_REQUEST_TIMEOUT",
}
DEFAULT_TIMEOUT = 30.0


def config_path() -> Path:
    if explicit := os.environ.get("NEGMERGE_CONFIG"):
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "negmerge" / "config.toml"


def read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise click.ClickException(f"{path}: not a valid TOML file ({exc})") from None


def write_config(path: Path, values: dict[str, Any]) -> None:
    """Write `values` as TOML, readable by the owner only: the file may hold an API key."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    # A JSON string is a valid TOML basic string, and a JSON number a valid TOML number.
    lines = [f"{key} = {json.dumps(value, ensure_ascii=False)}\n" for key, value in values.items()]
    text = "".join(lines)
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            file.write(text)
        os.chmod(partial, 0o600)  # whatever the umask
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)


@dataclass(frozen=True)
class Connection:
    """The URL, key and timeout to use, and where each came from."""

    api_url: str
    api_key: str | None
    timeout: float
    sources: dict[str, str] = field(default_factory=dict)


def resolve(api_url: str | None, api_key: str | None, timeout: float | None) -> Connection:
    flags = {"api_url": api_url, "api_key": api_key, "request_timeout": timeout}
    path = config_path()
    stored = read_config(path)
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for key in KEYS:
        for source, value in (
            ("flag", flags[key]),
            (ENV[key], os.environ.get(ENV[key]) or None),
            (str(path), stored.get(key)),
        ):
            if value is not None:
                values[key], sources[key] = value, source
                break
    return Connection(
        api_url=_url(str(values.get("api_url", DEFAULT_API_URL)), sources.get("api_url")),
        api_key=str(values["api_key"]) if "api_key" in values else None,
        timeout=_timeout(
            values.get("request_timeout", DEFAULT_TIMEOUT), sources.get("request_timeout")
        ),
        sources=sources,
    )


def _url(value: str, source: str | None) -> str:
    if not value.startswith(("http://", "https://")):
        where = f" (from {source})" if source else ""
        raise click.ClickException(f"API URL {value!r}{where} must start with http:// or https://")
    return value.rstrip("/")


def _timeout(value: Any, source: str | None) -> float:
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = 0.0
    if seconds <= 0:
        raise click.ClickException(f"timeout {value!r} (from {source}) must be a positive number")
    return seconds


def masked(key: str | None) -> str:
    if not key:
        return "(none)"
    return f"{key[:8]}…{key[-4:]}" if len(key) > 16 else "****"


@click.group()
def config() -> None:
    """The client's settings file (TOML): the service's URL and your API key."""


@config.command("set")
@click.argument("key", type=click.Choice(sorted(KEYS)))
@click.argument("value")
def config_set(key: str, value: str) -> None:
    """Store KEY (api_url, api_key, request_timeout) in the settings file (mode 0600)."""
    stored_value: Any = value
    if key == "api_url":
        stored_value = _url(value, "the command line")
    elif key == "request_timeout":
        stored_value = _timeout(value, "the command line")
    path = config_path()
    values = read_config(path)
    values[key] = stored_value
    write_config(path, values)
    shown = masked(value) if key == "api_key" else stored_value
    click.echo(f"{key} = {shown}  ({path})")


@config.command("unset")
@click.argument("key", type=click.Choice(sorted(KEYS)))
def config_unset(key: str) -> None:
    """Remove KEY from the settings file."""
    path = config_path()
    values = read_config(path)
    if values.pop(key, None) is not None:
        write_config(path, values)
    click.echo(f"{key} removed ({path})")


@config.command("show")
def config_show() -> None:
    """The URL, key and request timeout the commands would use, and where each comes from."""
    connection = resolve(None, None, None)
    rows = {
        "api_url": connection.api_url,
        "api_key": masked(connection.api_key),
        "request_timeout": f"{connection.timeout:g}",
    }
    for key, value in rows.items():
        click.echo(f"{key:15} {value}  ({connection.sources.get(key, 'default')})")
    click.echo(f"{'file':15} {config_path()}")


@config.command("path")
def config_path_command() -> None:
    """Print where the settings file is (it may not exist yet)."""
    click.echo(str(config_path()))
