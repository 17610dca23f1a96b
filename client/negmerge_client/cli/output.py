"""How the client commands print: rich tables for people, JSON for machines."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

import click
from rich.console import Console
from rich.table import Table


def console(stderr: bool = False) -> Console:
    """A console on the current stdout (or stderr). Off a terminal, a wide one, so that piped
    tables keep one row a line."""
    probe = Console(stderr=stderr)
    return Console(stderr=stderr, width=None if probe.is_terminal else 200, highlight=False)


def print_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, ensure_ascii=False))


def print_table(title: str | None, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    table = Table(title=title)
    for column in columns:
        table.add_column(column, no_wrap=column in {"id", "sha256"})
    for row in rows:
        table.add_row(*("" if cell is None else str(cell) for cell in row))
    console().print(table)


def print_fields(rows: Iterable[tuple[str, Any]]) -> None:
    """Label / value lines, skipping empty values."""
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold", min_width=11)  # the same width in every block
    table.add_column()
    for label, value in rows:
        if value not in (None, "", []):
            table.add_row(label, str(value))
    console().print(table)


def when(moment: str | None) -> str:
    """An API timestamp, to the second."""
    return moment.replace("T", " ")[:19] if moment else ""


def number(value: Any, spec: str = ".2f") -> str:
    return "" if value is None else format(value, spec)


def size(count: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024  # type: ignore[assignment]
    return str(count)
