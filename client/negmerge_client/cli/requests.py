"""`negmerge-client requests ...`: send, list and show data subjects' deletion requests."""

from __future__ import annotations

import click

from negmerge_client.cli.connection import with_service
from negmerge_client.cli.output import print_json, print_table, when
from negmerge_client.client import ServiceClient


@click.group()
def requests() -> None:
    """Data subjects' deletion requests (batched into unlearning jobs by the model's policy)."""


@requests.command("submit")
@click.option("--model", "model_id", required=True)
@click.option("--dataset", "dataset_id", required=True)
@click.option("--id", "ids", multiple=True, help="A sample to forget (repeat for more).")
@click.option("--class", "classes", multiple=True, help="A class to forget (repeat for more).")
@click.option("--subject", "subject_reference", required=True, help="Your reference for it.")
@click.option("--legal-basis")
@click.option("--due", "due_at", help="Due date, ISO 8601 with a time zone (default: a month).")
@click.option("--json", "as_json", is_flag=True, help="Print the request as JSON.")
@with_service
def submit(
    service: ServiceClient,
    model_id: str,
    dataset_id: str,
    ids: tuple[str, ...],
    classes: tuple[str, ...],
    subject_reference: str,
    legal_basis: str | None,
    due_at: str | None,
    as_json: bool,
) -> None:
    """Send a deletion request; prints its id (an existing request's, for a duplicate)."""
    body = {
        "model_id": model_id,
        "dataset_id": dataset_id,
        "ids": list(ids) or None,
        "classes": list(classes) or None,
        "subject_reference": subject_reference,
        "legal_basis": legal_basis,
        "due_at": due_at,
    }
    made = service.submit_deletion_request({k: v for k, v in body.items() if v is not None})
    if as_json:
        print_json(made)
        return
    click.echo(made["id"])
    if made.get("duplicate_of"):
        click.echo(f"duplicate: already requested ({made['state']})", err=True)
    else:
        click.echo(f"received, due {when(made['due_at'])}", err=True)


@requests.command("list")
@click.option("--state", multiple=True, help="Only these states (repeat for more).")
@click.option("--model", "model_id")
@click.option("--subject", "subject_reference")
@click.option("--json", "as_json", is_flag=True, help="Print the requests as a JSON array.")
@with_service
def list_requests(
    service: ServiceClient,
    state: tuple[str, ...],
    model_id: str | None,
    subject_reference: str | None,
    as_json: bool,
) -> None:
    """The tenant's deletion requests, newest first."""
    found = list(
        service.list_deletion_requests(
            list(state), model_id=model_id, subject_reference=subject_reference
        )
    )
    if as_json:
        print_json(found)
        return
    columns = ("id", "state", "subject", "samples", "due", "job")
    rows = (
        (r["id"], r["state"] + (" (overdue)" if r["overdue"] else ""), r["subject_reference"],
         r["sample_count"], when(r["due_at"]), r["job_id"] or "")
        for r in found
    )  # fmt: skip
    print_table(None, columns, rows)


@requests.command("show")
@click.argument("request_id")
@with_service
def show(service: ServiceClient, request_id: str) -> None:
    """A request as JSON: state, due date, job, the version that carries it, its evidence."""
    print_json(service.get_deletion_request(request_id))
