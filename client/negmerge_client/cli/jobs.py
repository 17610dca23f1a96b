"""`negmerge-client jobs ...`: submit deletion requests, follow them, cancel them, read the report.

`wait` (and `submit --wait`) exit with the job's outcome: 0 SUCCEEDED with its target met,
5 SUCCEEDED but the target not met (it did not forget as asked), 1 FAILED (or any error),
3 CANCELLED, 4 still running when --timeout ran out (2 is click's usage error)."""

from __future__ import annotations

from pathlib import Path
from typing import IO, Any

import click

from negmerge_client.cli.bodies import load_body, read_ids, split_list
from negmerge_client.cli.connection import with_service
from negmerge_client.cli.output import print_fields, print_json, print_table, when
from negmerge_client.cli.progress import JobProgress
from negmerge_client.client import ServiceClient, ServiceError

EXIT_FAILED, EXIT_CANCELLED, EXIT_TIMEOUT, EXIT_TARGET_NOT_MET = 1, 3, 4, 5
STATES = ("QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLING", "CANCELLED")


class JobEnded(click.ClickException):
    """The job ended without success: one line on stderr and the outcome's exit code."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@click.group()
def jobs() -> None:
    """Unlearning jobs (deletion requests) on the service."""


@jobs.command("submit")
@click.option("-f", "--file", "body_file", type=click.File("r"), help="Body as JSON or YAML.")
@click.option("--model", "model_id", help="The model to make forget.")
@click.option("--version", type=click.IntRange(min=1), help="Its version (default: latest).")
@click.option("--dataset", "dataset_id", help="The data set the forget set is drawn from.")
@click.option("--forget-classes", metavar="A,B", help="Forget these whole classes.")
@click.option(
    "--forget-ids-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Forget these samples: a file with one id a line.",
)
@click.option("--preset", help="Variant preset, e.g. tiny-classifier or clip-paper.")
@click.option("--subject-reference", help="Your reference for the data subject or ticket.")
@click.option("--legal-basis", help="e.g. 'GDPR Art. 17'.")
@click.option("--webhook-url", help="Called when the job ends.")
@click.option("--idempotency-key", help="Retries with the same key return the same job.")
@click.option("--wait", "wait_too", is_flag=True, help="Wait for the job to end (see `wait`).")
@click.option("--timeout", "wait_timeout", type=float, help="With --wait: give up after this.")
@click.option("--json", "as_json", is_flag=True, help="Print the job as JSON.")
@with_service
def submit(
    service: ServiceClient,
    body_file: IO[str] | None,
    idempotency_key: str | None,
    wait_too: bool,
    wait_timeout: float | None,
    as_json: bool,
    **flags: Any,
) -> None:
    """Submit a deletion request: a body file (-f job.yaml), flags, or both (flags win).
    Prints the job's id."""
    body = job_body(load_body(body_file) if body_file else {}, **flags)
    job = service.submit_job(body, idempotency_key=idempotency_key)
    if not wait_too:
        if as_json:
            print_json(job)
        else:
            click.echo(job["id"])
        return
    click.echo(f"submitted job {job['id']}", err=True)
    _wait(service, job["id"], interval=2.0, timeout=wait_timeout, as_json=as_json)


def job_body(
    body: dict[str, Any],
    *,
    model_id: str | None,
    version: int | None,
    dataset_id: str | None,
    forget_classes: str | None,
    forget_ids_file: Path | None,
    preset: str | None,
    subject_reference: str | None,
    legal_basis: str | None,
    webhook_url: str | None,
) -> dict[str, Any]:
    """`body` with the flags' values put in their places."""
    if forget_classes and forget_ids_file:
        raise click.UsageError("give --forget-classes or --forget-ids-file, not both")
    if model_id or version:
        model = body.setdefault("model", {})
        model.update({k: v for k, v in (("id", model_id), ("version", version)) if v})
    if dataset_id or forget_classes or forget_ids_file:
        forget = body.setdefault("forget", {})
        if dataset_id:
            forget["dataset_id"] = dataset_id
        if forget_classes:  # one selection replaces the other
            forget.pop("ids", None)
            forget["classes"] = split_list(forget_classes)
        if forget_ids_file:
            forget.pop("classes", None)
            forget["ids"] = read_ids(forget_ids_file)
    if preset:
        body.setdefault("variants", {})["preset"] = preset
    for key, value in (
        ("subject_reference", subject_reference),
        ("legal_basis", legal_basis),
        ("webhook_url", webhook_url),
    ):
        if value is not None:
            body[key] = value
    return body


@jobs.command("get")
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True, help="Print the job as JSON.")
@with_service
def get(service: ServiceClient, job_id: str, as_json: bool) -> None:
    """A job's state, progress and result."""
    job = service.get_job(job_id)
    if as_json:
        print_json(job)
        return
    progress, result, error = job["progress"], job.get("result") or {}, job.get("error")
    print_fields(
        [
            ("job", job["id"]),
            ("state", job["state"] + (f" ({job['stage']})" if job.get("stage") else "")),
            ("progress", f"{progress['percent']:.0f}%  variants {progress['variants_done']}/"
             f"{progress['variants_total']}  lambdas {progress['lambdas_evaluated']}"),
            ("model", f"{job['model']['id']} v{job['model']['version']}"),
            ("forget", f"{job['forget']['count']} samples of data set "
             f"{job['forget']['dataset_id']}"),
            ("subject", job.get("subject_reference")),
            ("legal basis", job.get("legal_basis")),
            ("created", when(job["created_at"])),
            ("started", when(job.get("started_at"))),
            ("finished", when(job.get("finished_at"))),
            ("error", f"{error['code']}: {error['message']}" if error else None),
            ("verdict", verdict_line(job.get("verdict"))),
            ("new version", (result.get("model") or {}).get("version")),
            ("lambda", result.get("lambda")),
        ]
    )  # fmt: skip


def verdict_line(verdict: dict[str, Any] | None) -> str | None:
    """'met: ...' or 'NOT MET: ...', the reason with its numbers; None before the end."""
    if not verdict:
        return None
    head = "met" if verdict.get("met") else "NOT MET"
    return f"{head}: {str(verdict.get('reason', '')).split(': ', 1)[-1]}"


@jobs.command("list")
@click.option("--state", "states", type=click.Choice(STATES), multiple=True, help="Repeatable.")
@click.option("--model", "model_id", help="Only this model's jobs.")
@click.option("--subject-reference", help="Only jobs with this reference.")
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the jobs as a JSON array.")
@with_service
def list_jobs(
    service: ServiceClient,
    states: tuple[str, ...],
    model_id: str | None,
    subject_reference: str | None,
    limit: int,
    as_json: bool,
) -> None:
    """The tenant's jobs, newest first."""
    found = []
    pages = service.list_jobs(
        states, model_id=model_id, subject_reference=subject_reference, page_size=min(limit, 200)
    )
    for job in pages:  # the pages are fetched lazily: stop at the limit
        found.append(job)
        if len(found) == limit:
            break
    if as_json:
        print_json(found)
        return
    columns = ("id", "state", "stage", "done", "model", "subject", "created")
    rows = (
        (j["id"], j["state"], j.get("stage"), f"{j['progress']['percent']:.0f}%",
         f"{j['model']['id'][:8]} v{j['model']['version']}", j.get("subject_reference"),
         when(j["created_at"]))
        for j in found
    )  # fmt: skip
    print_table(None, columns, rows)


@jobs.command("wait")
@click.argument("job_id")
@click.option("--interval", type=float, default=2.0, show_default=True,
              help="Seconds between polls when the server gives no Retry-After.")  # fmt: skip
@click.option("--timeout", "wait_timeout", type=float, help="Give up after this many seconds.")
@click.option("--json", "as_json", is_flag=True, help="Print the ended job as JSON.")
@with_service
def wait(
    service: ServiceClient, job_id: str, interval: float, wait_timeout: float | None, as_json: bool
) -> None:
    """Follow a job until it ends, with a progress bar on stderr. Exits 0 if it SUCCEEDED and
    met its target, 5 if it SUCCEEDED without meeting it, 1 if it FAILED, 3 if it was
    CANCELLED, 4 if --timeout ran out first."""
    _wait(service, job_id, interval, wait_timeout, as_json)


def _wait(
    service: ServiceClient, job_id: str, interval: float, timeout: float | None, as_json: bool
) -> None:
    try:
        with JobProgress() as progress:
            job = service.wait_for_job(job_id, progress.update, interval, timeout)
    except ServiceError as exc:
        if exc.code == "timeout":
            raise JobEnded(str(exc), EXIT_TIMEOUT) from None
        raise
    if as_json:
        print_json(job)
    state = job["state"]
    if state == "FAILED":
        error = job.get("error") or {}
        detail = f"{error.get('code', 'error')}: {error.get('message', '')}".rstrip(": ")
        raise JobEnded(f"job {job_id} FAILED: {detail}", EXIT_FAILED)
    if state == "CANCELLED":
        raise JobEnded(f"job {job_id} was CANCELLED", EXIT_CANCELLED)
    result = job.get("result") or {}
    verdict = job.get("verdict")
    version = (result.get("model") or {}).get("version")
    made = f"version {version}" if version is not None else "no new version"
    summary = f"model {job['model']['id']} {made} (lambda {result.get('lambda')})"
    if verdict is not None and not verdict.get("met"):
        # Ran to the end, did not forget as asked: not a success, whatever the state says.
        raise JobEnded(
            f"job {job_id} SUCCEEDED but its target was NOT MET: {summary}; "
            f"{verdict_line(verdict)}",
            EXIT_TARGET_NOT_MET,
        )
    if not as_json:
        click.echo(f"job {job_id} SUCCEEDED, {verdict_line(verdict) or 'no verdict'}: {summary}")


@jobs.command("cancel")
@click.argument("job_id")
@with_service
def cancel(service: ServiceClient, job_id: str) -> None:
    """Cancel a job: a queued one at once, a running one when its worker stops."""
    job = service.cancel_job(job_id)
    click.echo(f"job {job['id']} {job['state']}")


@jobs.command("report")
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True, help="Print the whole report as JSON.")
@with_service
def report(service: ServiceClient, job_id: str, as_json: bool) -> None:
    """The job's evidence report: the before/after table, lambda, the kept fraction of the
    merged task vector, and the models' hashes."""
    found = service.job_report(job_id)
    if as_json:
        print_json(found)
        return
    from negmerge_client.cli.report import print_report

    # kept_fraction and the merged task vector's hash are in the job's result only
    print_report(found, service.get_job(job_id))
