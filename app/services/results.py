"""A finished job's result: what the API, the dashboard, webhooks and the report read, built
in one place from the pipeline's report (negmerge.pipeline.finalize) and the model version
the worker stored (None at lambda 0)."""

from __future__ import annotations

from typing import Any


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
        "split_sizes": report["split_sizes"],
        "code_version": report["code_version"],
        "seeds": report["seeds"],
        "base_model_sha256": report["base_model"]["sha256"],
        "merged_sha256": merge["merged_sha256"],
        "merged_bytes": merge.get("merged_bytes"),
        "merged_dense_bytes": merge.get("merged_dense_bytes"),
        "task_vector_sha256": [v["tau_sha256"] for v in report["variants"]],
        "finetuning": report.get("finetuning", "standard"),
        "round": report.get("round", 0),
        "rounds": report.get("rounds", []),
        "timings": report["timings"],
    }
