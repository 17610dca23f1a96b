"""What the pages show, worked out from rows and query strings: the job list's filters, the
metrics table, a job's live status and the deletion requests' rows."""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

from sqlalchemy.orm import Session
from starlette.datastructures import QueryParams

from app.db.models import AuditEntry, DeletionRequest, JobState, UnlearningJob
from app.db.repositories import DatasetRepository, JobFilter, JobRepository
from app.schemas.deletion_requests import DeletionRequestOut
from app.schemas.jobs import DataDeletion
from app.schemas.results import JobResult
from app.services.deletion_requests import request_view
from app.services.results import data_deletion
from negmerge.verdict import Verdict

SUBJECT_MAX = 200  # as the column and the REST API's filter


@dataclass(frozen=True)
class ListQuery:
    """The job list's filters, parsed from the form's query string. Empty fields mean "any";
    a field that does not parse is ignored and named in `problems`."""

    where: JobFilter
    page_token: str | None
    form: dict[str, Any]  # what the form shows again
    problems: list[str] = field(default_factory=list)

    def page_url(self, page_token: str) -> str:
        params: list[tuple[str, str]] = [("state", s) for s in self.form["states"]]
        params += [
            (name, self.form[name])
            for name in ("model", "subject", "created_after", "created_before")
            if self.form[name]
        ]
        params.append(("page_token", page_token))
        return "/dashboard/jobs?" + urlencode(params)


def parse_list_query(params: QueryParams) -> ListQuery:
    problems: list[str] = []
    states = []
    for raw in params.getlist("state"):
        if raw in JobState.__members__:
            states.append(JobState(raw))
        elif raw:
            problems.append(f"state: {raw!r} is not a job state")
    model = params.get("model", "").strip()
    model_id = None
    if model:
        try:
            model_id = uuid.UUID(model)
        except ValueError:
            problems.append("model: not a model id")
    subject = params.get("subject", "").strip()
    if len(subject) > SUBJECT_MAX:
        problems.append(f"subject reference: longer than {SUBJECT_MAX} characters")
        subject = ""
    after = _moment(params.get("created_after", ""), "created after", problems)
    before = _moment(params.get("created_before", ""), "created before", problems)
    form = {
        "states": [s.value for s in states],
        "model": str(model_id) if model_id else "",
        "subject": subject,
        "created_after": params.get("created_after", "") if after else "",
        "created_before": params.get("created_before", "") if before else "",
    }
    where = JobFilter(
        states=states,
        model_id=model_id,
        subject_reference=subject or None,
        created_after=after,
        created_before=before,
    )
    return ListQuery(where, params.get("page_token") or None, form, problems)


def _moment(raw: str, name: str, problems: list[str]) -> datetime | None:
    """A time from the form (datetime-local sends no zone: it is read as UTC, as the API does)."""
    raw = raw.strip()
    if not raw:
        return None
    try:
        moment = datetime.fromisoformat(raw)
    except ValueError:
        problems.append(f"{name}: not a date and time")
        return None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


# ---- a job's page ----------------------------------------------------------------------------

# Each row names its split: the λ chart is drawn on the validation splits the search uses,
# the report's metrics on the others, and a reader must see that they are not the same data.
METRIC_LABELS = {
    "forget_acc": "Forget accuracy · forget set, train split",
    "forget_test_acc": "Forget accuracy · forget set, test split",
    "retain_acc": "Retain accuracy · retain data, train split",
    "test_acc": "Test accuracy · retain data, test split",
    "mia": "MIA efficacy · forget set against retain train and test",
}
METRIC_SPLITS = {"forget_acc": "forget", "forget_test_acc": "forget_test", "retain_acc": "retain",
                 "test_acc": "test"}  # fmt: skip
# The search's numbers at λ = 0 and at the chosen λ: the chart's points, as table rows.
SEARCH_LABELS = {
    "forget_acc": ("forget_val", "Forget accuracy · validation split (the λ search's)"),
    "retain_acc": ("retain_val", "Retain accuracy · validation split (the λ search's)"),
}


# Metrics that unlearning should lower (the rest it should keep or raise).
LOWER_IS_BETTER = {"forget_acc", "forget_test_acc", "search_forget_acc"}


@dataclass(frozen=True)
class MetricRow:
    key: str
    label: str
    before: float | None
    after: float | None
    size: int | None = None  # samples in the split (evaluations take at most max_eval_samples)
    search: bool = False  # a validation-split row, from the λ search

    @property
    def delta(self) -> float | None:
        if self.before is None or self.after is None:
            return None
        return self.after - self.before

    @property
    def change(self) -> str:
        """Whether the change is what unlearning wants ("good": forget accuracy down, retain
        and test accuracy or MIA efficacy up), "bad", or "" (none)."""
        if not self.delta:
            return ""
        wanted_down = self.key in LOWER_IS_BETTER
        return "good" if (self.delta < 0) == wanted_down else "bad"


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def metric_rows(result: JobResult) -> list[MetricRow]:
    """Before and after, one row per metric: the known ones in a fixed order, then any other
    the workers reported, then the λ search's validation-split numbers at λ = 0 and at the
    chosen λ (the chart's), so that the table and the chart can be read side by side."""
    if result.metrics is None:
        return []
    before, after, sizes = result.metrics.before, result.metrics.after, result.split_sizes
    keys = [k for k in METRIC_LABELS if k in before or k in after]
    keys += sorted((set(before) | set(after)) - set(METRIC_LABELS))
    rows = [
        MetricRow(
            key,
            METRIC_LABELS.get(key, key.replace("_", " ")),
            _finite(before.get(key)),
            _finite(after.get(key)),
            sizes.get(METRIC_SPLITS.get(key, "")),
        )
        for key in keys
    ]
    at_zero = next((p for p in result.lambda_curve if p.lambda_ == 0.0), None)
    at_chosen = next((p for p in result.lambda_curve if p.lambda_ == result.lambda_), None)
    if at_zero is not None and at_chosen is not None:
        for key, (split, label) in SEARCH_LABELS.items():
            rows.append(
                MetricRow(
                    f"search_{key}",
                    label,
                    _finite(getattr(at_zero, key)),
                    _finite(getattr(at_chosen, key)),
                    sizes.get(split),
                    search=True,
                )
            )
    return rows


@dataclass(frozen=True)
class Outcome:
    """How a job's end reads at a glance: a SUCCEEDED job that missed its target is amber,
    never the green of one that met it."""

    text: str
    css: str  # the badge's state-* class


def outcome(job: UnlearningJob) -> Outcome:
    if job.state is not JobState.SUCCEEDED:
        return Outcome(job.state.value, job.state.value.lower())
    verdict = verdict_of(job)
    if verdict is None:
        return Outcome("SUCCEEDED · no verdict", "unjudged")
    if verdict.met:
        return Outcome("SUCCEEDED · target met", "succeeded")
    return Outcome("SUCCEEDED · target not met", "not-met")


def verdict_of(job: UnlearningJob) -> Verdict | None:
    result = JobResult.of(job.result)
    return result.verdict if result else None


def retain_ratio(job: UnlearningJob) -> float | None:
    """The share of the original retain accuracy the search had to keep (the job's spec)."""
    search = (job.spec or {}).get("search")
    return _finite(search.get("retain_ratio")) if isinstance(search, dict) else None


@dataclass(frozen=True)
class AuditRow:
    entry: AuditEntry
    about_job: bool  # False: another resource's entry that falls in the job's range


def concerns_job(entry: AuditEntry, job_id: uuid.UUID) -> bool:
    """An entry about the job itself, or one it caused (the model version it added)."""
    details = entry.details if isinstance(entry.details, dict) else {}
    return entry.resource_id == str(job_id) or details.get("job_id") == str(job_id)


def forgot(job: UnlearningJob) -> bool:
    """Whether the page may say the data was forgotten: the job succeeded and met its target
    (a cancelled, failed or not-met job only says what was requested)."""
    verdict = verdict_of(job)
    return job.state is JobState.SUCCEEDED and verdict is not None and verdict.met


def live_status(job: UnlearningJob) -> dict[str, Any]:
    """What the pages' script updates while a job runs."""
    return {
        "id": str(job.id),
        "state": job.state.value,
        "badge_text": outcome(job).text,
        "badge_class": outcome(job).css,
        "stage": job.stage.value if job.stage else None,
        "percent": round(job.percent, 1),
        "variants_done": job.variants_done,
        "variants_total": job.variants_total,
        "lambdas_evaluated": job.lambdas_evaluated,
        "terminal": job.state.is_terminal,
        "updated_at": job.updated_at.isoformat(),
    }


# ---- deletion requests -----------------------------------------------------------------------


@dataclass(frozen=True)
class DeletionStatus:
    """Whether a job's data has been deleted, at a glance: `css` picks the badge's colour."""

    text: str
    css: str
    record: DataDeletion | None = None


def deletion_status(job: UnlearningJob | None) -> DeletionStatus:
    """From the job's retention record: deleted, kept (and why), or not yet."""
    if job is None:
        return DeletionStatus("not batched yet", "queued")
    record = data_deletion(job)
    if record is None:
        if not job.state.is_terminal:
            return DeletionStatus("job not ended", "running")
        return DeletionStatus("deletion pending", "running")
    if record.forget_data.deleted:
        return DeletionStatus("data deleted", "succeeded", record)
    return DeletionStatus("data kept", "not-met", record)


@dataclass(frozen=True)
class RequestRow:
    """A deletion request with what its page and the list show beside it."""

    request: DeletionRequestOut
    dataset_name: str
    job: UnlearningJob | None
    deletion: DeletionStatus

    @property
    def what(self) -> str:
        r = self.request
        samples = f"{r.sample_count} sample{'' if r.sample_count == 1 else 's'}"
        return f"{', '.join(r.classes)} ({samples})" if r.classes else samples


def request_rows(
    session: Session, tenant_id: uuid.UUID, requests: list[DeletionRequest]
) -> list[RequestRow]:
    """Each request's view, its data set's name and its job's deletion status (each data set
    and job read once)."""
    datasets, jobs = DatasetRepository(session, tenant_id), JobRepository(session, tenant_id)
    names: dict[uuid.UUID, str] = {}
    found: dict[uuid.UUID, UnlearningJob | None] = {}
    rows = []
    for request in requests:
        if request.dataset_id not in names:
            dataset = datasets.get(request.dataset_id)
            names[request.dataset_id] = dataset.name if dataset else str(request.dataset_id)
        job = None
        if request.job_id is not None:
            if request.job_id not in found:
                found[request.job_id] = jobs.get(request.job_id)
            job = found[request.job_id]
        rows.append(
            RequestRow(
                request_view(session, request),
                names[request.dataset_id],
                job,
                deletion_status(job),
            )
        )
    return rows
