"""A finished job's result: what the API, the dashboard, webhooks and the report read, built
in one place from the pipeline's report (negmerge.pipeline.finalize) and the model version
the worker stored (None at lambda 0)."""

from __future__ import annotations

from typing import Any

from app.db.models import UnlearningJob
from app.schemas.jobs import DataDeletion
from negmerge.verdict import Verdict


def job_result(report: dict[str, Any], model: dict[str, Any] | None) -> dict[str, Any]:
    """The job's result from its last round's `report` and the stored `model`
    ({model_id, version, version_id, weights_sha256})."""
    merge = report["merge"]
    return {
        "model": model,
        "model_version": model["version"] if model else None,
        "verdict": report["verdict"],
        "lambda": report["lambda"],
        "lambda_curve": report["search"].get("evaluations", []),
        "kept_fraction": merge["kept_fraction"],
        "metrics": report["metrics"],
        "metrics_before": report["metrics"]["before"],
        "metrics_after": report["metrics"]["after"],
        # Each deletion request's own samples, before and after (negmerge JobSpec.groups).
        "groups": report.get("groups", {}),
        "split_sizes": report["split_sizes"],
        "code_version": report["code_version"],
        "seeds": report["seeds"],
        # The base version's weights as stored and downloaded (what its version row and the
        # report name); base_copy_sha256 is the worker's re-serialised working copy of them.
        "base_model_sha256": report["base_model"].get("weights_sha256")
        or report["base_model"]["sha256"],
        "base_copy_sha256": report["base_model"]["sha256"],
        "merged_sha256": merge["merged_sha256"],
        "merged_bytes": merge.get("merged_bytes"),
        "merged_dense_bytes": merge.get("merged_dense_bytes"),
        "task_vector_sha256": [v["tau_sha256"] for v in report["variants"]],
        "finetuning": report.get("finetuning", "standard"),
        "round": report.get("round", 0),
        "rounds": report.get("rounds", []),
        "timings": report["timings"],
    }


def verdict_of(result: dict[str, Any] | None) -> Verdict | None:
    """The verdict a result carries (None before the job has one, or for old jobs)."""
    found = (result or {}).get("verdict")
    return Verdict.model_validate(found) if isinstance(found, dict) else None


def data_deletion(job: UnlearningJob) -> DataDeletion | None:
    """The job's retention record, once retention has run (without its working plan)."""
    record = job.data_deletion or {}
    if "forget_data" not in record:
        return None
    return DataDeletion.model_validate({k: v for k, v in record.items() if k != "plan"})
