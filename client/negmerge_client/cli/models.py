"""`negmerge-client models ...`: register base models, list them and their versions, download
weights (checked against the sha256 the service reports)."""

from __future__ import annotations

from typing import IO, Any

import click
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

from negmerge_client.cli.bodies import load_body, split_list
from negmerge_client.cli.connection import with_service
from negmerge_client.cli.output import console, print_json, print_table, size, when
from negmerge_client.client import ServiceClient


@click.group()
def models() -> None:
    """Models and their versions on the service."""


@models.command("register")
@click.option("-f", "--file", "body_file", type=click.File("r"), help="Body as JSON or YAML.")
@click.option("--name", help="Unique within the tenant.")
@click.option("--family", type=click.Choice(["open_clip", "classifier"]))
@click.option("--architecture", help="open_clip or timm model name, or one the server installed.")
@click.option("--classes", help="Comma-separated class names, in the model's output order.")
@click.option("--weights-uri", help="Where the server reads the weights (under its data roots).")
@click.option("--image-size", type=int)
@click.option("--description")
@click.option("--json", "as_json", is_flag=True, help="Print the model as JSON.")
@with_service
def register(
    service: ServiceClient,
    body_file: IO[str] | None,
    as_json: bool,
    **flags: Any,
) -> None:
    """Register a base model from a body file and/or flags (flags win); prints its id."""
    body = load_body(body_file) if body_file else {}
    flags["classes"] = split_list(flags["classes"])
    body.update({key: value for key, value in flags.items() if value is not None})
    model = service.register_model(body)
    if as_json:
        print_json(model)
        return
    click.echo(model["id"])
    click.echo(f"registered model {model['name']} as version {model['latest_version']}", err=True)


@models.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print the models as a JSON array.")
@with_service
def list_models(service: ServiceClient, as_json: bool) -> None:
    """The tenant's models."""
    found = list(service.list_models())
    if as_json:
        print_json(found)
        return
    columns = ("id", "name", "family", "architecture", "classes", "latest", "created")
    rows = (
        (m["id"], m["name"], m["family"], m["architecture"], len(m["classes"]),
         f"v{m['latest_version']}", when(m["created_at"]))
        for m in found
    )  # fmt: skip
    print_table(None, columns, rows)


@models.command("versions")
@click.argument("model_id")
@click.option("--json", "as_json", is_flag=True, help="Print the versions as a JSON array.")
@with_service
def versions(service: ServiceClient, model_id: str, as_json: bool) -> None:
    """The versions of MODEL_ID, oldest first (1 is the base model)."""
    found = service.model_versions(model_id)
    if as_json:
        print_json(found)
        return
    columns = ("version", "sha256", "size", "from", "made by job", "created")
    rows = (
        (v["version"], v["weights_sha256"], size(v["size_bytes"]),
         f"v{v['parent_version']}" if v["parent_version"] else "",
         v["produced_by_job_id"], when(v["created_at"]))
        for v in found
    )  # fmt: skip
    print_table(f"model {model_id}", columns, rows)


@models.command("download")
@click.argument("model_id")
@click.option("--version", type=click.IntRange(min=1), help="Default: the latest.")
@click.option(
    "-o",
    "--output",
    # A str, not a Path: Path drops the trailing "/" that says "./weights/" is a folder.
    type=click.Path(),
    default=".",
    show_default=True,
    help="A file, or a folder for <model>-v<version>.safetensors (an existing one, or a path "
    "ending in /).",
)
@with_service
def download(service: ServiceClient, model_id: str, version: int | None, output: str) -> None:
    """Download a version's weights and check their sha256; prints the file's path."""
    number = version or service.get_model(model_id)["latest_version"]
    err = console(stderr=True)
    columns = (TextColumn("downloading"), BarColumn(), DownloadColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err, transient=True, disable=not err.is_terminal) as bar:
        task = bar.add_task("download", total=None)
        path = service.download_model_version(
            model_id,
            number,
            output,
            on_progress=lambda done, total: bar.update(task, completed=done, total=total),
        )
    click.echo(str(path))
    click.echo(f"model {model_id} v{number}: sha256 verified", err=True)
