"""What the pages show, worked out from rows and query strings: the job list's filters, the
metrics table and a job's live status."""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

from starlette.datastructures import QueryParams

from app.db.models import JobState, UnlearningJob
from app.db.repositories import JobFilter

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

METRIC_LABELS = {
    "forget_acc": "Forget accuracy",
    "forget_test_acc": "Forget accuracy (test split)",
    "retain_acc": "Retain accuracy",
    "test_acc": "Test accuracy",
    "mia": "MIA efficacy",
}


@dataclass(frozen=True)
class MetricRow:
    key: str
    label: str
    before: float | None
    after: float | None

    @property
    def delta(self) -> float | None:
        if self.before is None or self.after is None:
            return None
        return self.after - self.before


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def metric_rows(result: dict[str, Any] | None) -> list[MetricRow]:
    """Before and after, one row per metric: the known ones in a fixed order, then any other
    the workers reported."""
    result = result or {}
    metrics = result.get("metrics") if isinstance(result.get("metrics"), dict) else {}
    before = metrics.get("before") or result.get("metrics_before") or {}
    after = metrics.get("after") or result.get("metrics_after") or {}
    if not isinstance(before, dict) or not isinstance(after, dict):
        return []
    keys = [k for k in METRIC_LABELS if k in before or k in after]
    keys += sorted((set(before) | set(after)) - set(METRIC_LABELS))
    return [
        MetricRow(
            key,
            METRIC_LABELS.get(key, key.replace("_", " ")),
            _finite(before.get(key)),
            _finite(after.get(key)),
        )
        for key in keys
    ]


def retain_ratio(job: UnlearningJob) -> float | None:
    """The share of the original retain accuracy the search had to keep (the job's spec)."""
    search = (job.spec or {}).get("search")
    return _finite(search.get("retain_ratio")) if isinstance(search, dict) else None


def unlearned_model(result: dict[str, Any] | None) -> dict[str, Any]:
    model = (result or {}).get("model")
    return model if isinstance(model, dict) else {}


def live_status(job: UnlearningJob) -> dict[str, Any]:
    """What the pages' script updates while a job runs."""
    return {
        "id": str(job.id),
        "state": job.state.value,
        "stage": job.stage.value if job.stage else None,
        "percent": round(job.percent, 1),
        "variants_done": job.variants_done,
        "variants_total": job.variants_total,
        "lambdas_evaluated": job.lambdas_evaluated,
        "terminal": job.state.is_terminal,
        "updated_at": job.updated_at.isoformat(),
    }
