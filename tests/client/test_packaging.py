"""The client is a distribution of its own (client/): it imports nothing of the server, it
declares exactly the packages it imports, and each command has one spelling across the
server's `negmerge` and the client's `negmerge-client`."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import tomllib
from importlib.metadata import EntryPoint, packages_distributions
from pathlib import Path

import click
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from setuptools import find_namespace_packages

from negmerge.cli import main as server_main

REPO = Path(__file__).resolve().parents[2]
CLIENT = REPO / "client"
SERVER_PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
CLIENT_PYPROJECT = tomllib.loads((CLIENT / "pyproject.toml").read_text())
SERVER_SIDE = {"app", "negmerge", "worker", "torch", "fastapi", "sqlalchemy", "celery"}

# Imports every module of the package with the server's packages made unimportable, then
# checks that none of them was loaded anyway.
IMPORT_ALONE = f"""
import importlib, pkgutil, sys

class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {SERVER_SIDE!r}:
            raise ImportError(f"the client imported {{name}}")

sys.meta_path.insert(0, Refuse())
import negmerge_client, negmerge_client.cli
for module in pkgutil.walk_packages(negmerge_client.__path__, "negmerge_client."):
    importlib.import_module(module.name)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in {SERVER_SIDE!r})
assert not loaded, loaded
print(negmerge_client.__file__)
"""


def test_the_client_imports_without_the_server(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(CLIENT)}  # this checkout's client, not the repo
    done = subprocess.run(
        [sys.executable, "-c", IMPORT_ALONE],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert Path(done.stdout.strip()).is_relative_to(CLIENT / "negmerge_client")


def third_party_imports(package: Path) -> set[str]:
    """The top-level modules that the package's files import, other than its own and stdlib."""
    names = set()
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"__future__", package.name}


def test_the_client_declares_what_it_imports_and_nothing_of_the_server() -> None:
    declared = {
        canonicalize_name(Requirement(line).name)
        for line in CLIENT_PYPROJECT["project"]["dependencies"]
    }
    distributions = packages_distributions()
    imported = {
        canonicalize_name(distribution)
        for module in third_party_imports(CLIENT / "negmerge_client")
        for distribution in distributions[module]
    }
    assert declared == imported
    server_only = {
        canonicalize_name(Requirement(line).name)
        for line in SERVER_PYPROJECT["project"]["optional-dependencies"]["service"]
        if Requirement(line).name != "httpx"  # the webhook deliveries use it too
    } | {"negmerge-service", "torch", "torchvision", "open-clip-torch", "timm"}
    assert not declared & server_only


def test_the_server_distribution_leaves_the_client_package_out() -> None:
    found = find_namespace_packages(
        where=str(REPO),
        include=SERVER_PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"],
    )
    assert {"negmerge", "app", "worker"} <= set(found)
    assert not [name for name in found if "negmerge_client" in name]


def command_paths(group: click.Group, prefix: str) -> dict[int, list[str]]:
    """Every command under GROUP, by identity, with the spellings that reach it."""
    paths: dict[int, list[str]] = {}
    for name, command in group.commands.items():
        spelling = f"{prefix} {name}" if prefix else name
        paths.setdefault(id(command), []).append(spelling)
        if isinstance(command, click.Group):
            for key, more in command_paths(command, spelling).items():
                paths.setdefault(key, []).extend(more)
    return paths


def test_each_command_has_one_spelling() -> None:
    plugins = SERVER_PYPROJECT["project"]["entry-points"]["negmerge.commands"]
    server = click.Group(
        commands={
            **server_main.commands,  # the library's own
            **{name: EntryPoint(name, value, "").load() for name, value in plugins.items()},
        }
    )
    (script,) = CLIENT_PYPROJECT["project"]["scripts"].items()
    client = EntryPoint(*script, "").load()
    assert script[0] == "negmerge-client" and isinstance(client, click.Group)

    assert not set(server.commands) & set(client.commands)
    both = click.Group(commands={"negmerge": server, "negmerge-client": client})
    paths = command_paths(both, prefix="")
    twice = [spellings for spellings in paths.values() if len(spellings) > 1]
    assert not twice, twice
    assert {"negmerge admin tenants", "negmerge-client jobs"} <= {p for (p,) in paths.values()}
