"""Every query goes through app.db's repositories: services, routers, the dashboard and the
workers never build or run a statement themselves, so none of them can forget a tenant's
filter. The check reads the source (no import): a call of `session.get`, `.scalars`,
`.scalar` or `.execute`, or of SQLAlchemy's `select`, outside app/db fails it."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CHECKED = ("app/services", "app/api", "app/dashboard", "app/cli.py", "worker")
SESSION_CALLS = {"get", "scalars", "scalar", "execute"}

# (file, the call as written): queries that have not moved yet, each with why. A listed call
# that is gone fails the test too, so the list never outlives its reason.
ALLOWED: set[tuple[str, str]] = set()


def _is_session(node: ast.expr) -> bool:
    """`session` or `<anything>.session`."""
    return (isinstance(node, ast.Name) and node.id == "session") or (
        isinstance(node, ast.Attribute) and node.attr == "session"
    )


def queries_in(source: str) -> list[tuple[int, str]]:
    """(line, call) of every query the source makes itself."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        session_call = (
            isinstance(func, ast.Attribute)
            and func.attr in SESSION_CALLS
            and _is_session(func.value)
        )
        select_call = (isinstance(func, ast.Name) and func.id == "select") or (
            isinstance(func, ast.Attribute)
            and func.attr == "select"
            and isinstance(func.value, ast.Name)
            and func.value.id == "sqlalchemy"
        )
        if session_call or select_call:
            found.append((node.lineno, ast.unparse(node)))
    return sorted(found)


def test_the_check_finds_queries_and_nothing_else() -> None:
    source = (
        "job = session.get(UnlearningJob, job_id)\n"
        "rows = self.session.scalars(select(Model).where(Model.id == 1))\n"
        "n = ctx.session.scalar(stmt)\n"
        "session.execute(stmt)\n"
        "sqlalchemy.select(Model)\n"
        "chosen = manifest.select(ids=ids)\n"  # a data set's samples, not a query
        "value = params.get('model')\n"
        "bind = session.get_bind()\n"
        "'session.get(Model, 1) in a string'\n"
    )
    assert [line for line, _ in queries_in(source)] == [1, 2, 2, 3, 4, 5]


def test_queries_live_in_the_repositories() -> None:
    found = set()
    for folder in CHECKED:
        place = ROOT / folder
        for path in [place] if place.is_file() else sorted(place.rglob("*.py")):
            name = path.relative_to(ROOT).as_posix()
            for line, call in queries_in(path.read_text()):
                found.add((name, line, call))
    outside = sorted(
        f"{name}:{line}: {call}" for name, line, call in found if (name, call) not in ALLOWED
    )
    assert not outside, "queries outside app/db (move them into a repository):\n" + "\n".join(
        outside
    )
    stale = ALLOWED - {(name, call) for name, _, call in found}
    assert not stale, f"allowed queries that are gone (drop them from ALLOWED): {sorted(stale)}"
