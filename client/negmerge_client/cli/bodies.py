"""Request bodies from files: JSON or YAML, and lists given as flags."""

from __future__ import annotations

from pathlib import Path
from typing import IO, Any

import click
import yaml


def load_body(file: IO[str]) -> dict[str, Any]:
    """A JSON or YAML mapping (YAML is a superset of JSON, so one parser reads both)."""
    name = getattr(file, "name", "the body file")
    try:
        body = yaml.safe_load(file)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        problem = getattr(exc, "problem", None) or "not valid JSON or YAML"
        raise click.BadParameter(f"{name}{line}: {problem}", param_hint="'-f'") from None
    if not isinstance(body, dict):
        raise click.BadParameter(f"{name}: expected a mapping of fields", param_hint="'-f'")
    return body


def split_list(value: str | None) -> list[str] | None:
    """'a, b,c' -> ['a', 'b', 'c']."""
    if value is None:
        return None
    return [item.strip() for item in value.split(",") if item.strip()]


def read_ids(path: Path) -> list[str]:
    """One id a line; blank lines and lines starting with # are skipped."""
    lines = path.read_text(encoding="utf-8").splitlines()
    ids = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not ids:
        raise click.BadParameter(f"{path}: no ids in the file", param_hint="'--forget-ids-file'")
    return ids
