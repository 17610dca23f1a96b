"""A finished job's result (app.schemas.results.JobResult), built in one place from the
pipeline's report (negmerge.stage_outputs.Report, from negmerge.pipeline.finalize) and the
model version the worker stored (None at lambda 0)."""

from __future__ import annotations

from app.db.models import UnlearningJob
from app.schemas.jobs import DataDeletion
from app.schemas.results import JobResult, StoredVersion
from negmerge.stage_outputs import Report


def job_result(report: Report, model: StoredVersion | None) -> JobResult:
    """The job's result from its last round's `report` and the version it stored."""
    merge = report.merge
    return JobResult(
        model=model,
        verdict=report.verdict,
        lambda_=report.lambda_,
        lambda_curve=report.search.evaluations,
        kept_fraction=merge.kept_fraction,
        metrics=report.metrics,
        # Each deletion request's own samples, before and after (negmerge JobSpec.groups).
        groups=report.groups,
        split_sizes=report.split_sizes,
        code_version=report.code_version,
        seeds=report.seeds,
        # The base version's weights as stored and downloaded (what its version row and the
        # report name); base_copy_sha256 is the worker's re-serialised working copy of them.
        base_model_sha256=report.base_model.weights_sha256 or report.base_model.sha256,
        base_copy_sha256=report.base_model.sha256,
        merged_sha256=merge.merged_sha256,
        merged_bytes=merge.merged_bytes,
        merged_dense_bytes=merge.merged_dense_bytes,
        task_vector_sha256=[v.tau_sha256 for v in report.variants],
        finetuning=report.finetuning,
        round=report.round,
        rounds=report.rounds,
        timings=report.timings,
    )


def data_deletion(job: UnlearningJob) -> DataDeletion | None:
    """The job's retention record, once retention has run (without its working plan)."""
    record = job.data_deletion or {}
    if "forget_data" not in record:
        return None
    return DataDeletion.model_validate({k: v for k, v in record.items() if k != "plan"})
