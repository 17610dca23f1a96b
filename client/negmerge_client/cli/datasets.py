"""`negmerge-client datasets ...`: register a data set by manifest URI, or upload an archive."""

from __future__ import annotations

from pathlib import Path

import click

from negmerge_client.cli.connection import with_service
from negmerge_client.cli.output import print_json, print_table, when
from negmerge_client.client import JSON, ServiceClient


@click.group()
def datasets() -> None:
    """Data sets on the service (forget and retain sets are drawn from them)."""


def _created(dataset: JSON, as_json: bool) -> None:
    if as_json:
        print_json(dataset)
        return
    click.echo(dataset["id"])
    splits = ", ".join(f"{k} {v}" for k, v in dataset["split_counts"].items())
    click.echo(
        f"registered data set {dataset['name']}: {dataset['sample_count']} samples ({splits}), "
        f"labels {', '.join(dataset['labels'])}",
        err=True,
    )


@datasets.command("register")
@click.option("--name", required=True)
@click.option(
    "--manifest-uri", required=True, help="manifest.jsonl/.csv, its folder, or an ImageFolder."
)
@click.option("--root-uri", help="Root of the image paths (default: the manifest's folder).")
@click.option("--model", "model_id", help="Check every label against this model's classes.")
@click.option("--json", "as_json", is_flag=True, help="Print the data set as JSON.")
@with_service
def register(
    service: ServiceClient,
    name: str,
    manifest_uri: str,
    root_uri: str | None,
    model_id: str | None,
    as_json: bool,
) -> None:
    """Register a data set the server can read at MANIFEST_URI; prints its id."""
    dataset = service.register_dataset(name, manifest_uri, root_uri=root_uri, model_id=model_id)
    _created(dataset, as_json)


@datasets.command("upload")
@click.argument("archive", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--name", required=True)
@click.option("--model", "model_id", help="Check every label against this model's classes.")
@click.option("--json", "as_json", is_flag=True, help="Print the data set as JSON.")
@with_service
def upload(
    service: ServiceClient, archive: Path, name: str, model_id: str | None, as_json: bool
) -> None:
    """Upload ARCHIVE (zip or tar.gz: a manifest and images, or an ImageFolder tree); prints
    the new data set's id."""
    _created(service.upload_dataset(archive, name, model_id=model_id), as_json)


@datasets.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print the data sets as a JSON array.")
@with_service
def list_datasets(service: ServiceClient, as_json: bool) -> None:
    """The tenant's data sets."""
    found = list(service.list_datasets())
    if as_json:
        print_json(found)
        return
    columns = ("id", "name", "source", "samples", "labels", "created")
    rows = (
        (d["id"], d["name"], d["source"], d["sample_count"], len(d["labels"]),
         when(d["created_at"]))
        for d in found
    )  # fmt: skip
    print_table(None, columns, rows)
