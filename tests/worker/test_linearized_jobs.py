"""A linear (tangent-space) job end to end: the API, Redis and a real worker process run it on
the tiny classifier, and the version it stores is served with negmerge.models.load_linearized."""

from __future__ import annotations

import hashlib

import pytest
import torch

from negmerge.linearize import checkpoint_finetuning
from negmerge.models import ModelSpec, load_linearized, load_model
from tests.worker.conftest import job_body, register_tenant, submit, wait_for

SHORT_VARIANTS = {
    "preset": "tiny-classifier",
    "base": {"epochs": 2},
    "grid": {"augment": ["rand-m9-n2", "rand-m9-n3"]},
}


@pytest.fixture(scope="module")
def worker(start_worker, watchdog):  # type: ignore[no-untyped-def]
    process = start_worker("linearized")
    yield process
    process.stop()


def test_a_linear_job_stores_a_linearized_version_that_serves_the_tangent_model(
    client, db, classifier, worker, tmp_path
):
    tenant = register_tenant(client, db, classifier)
    body = job_body(tenant, finetuning="linear", variants=SHORT_VARIANTS)
    job = wait_for(client, tenant, submit(client, tenant, body), timeout=400)
    assert job["state"] == "SUCCEEDED", job
    result = job["result"]
    assert result["finetuning"] == "linear" and result["model"]["version"] == 2
    assert result["metrics"]["after"]["forget_acc"] < result["metrics"]["before"]["forget_acc"]

    versions = client.get(f"/v1/models/{tenant.model_id}/versions", headers=tenant.headers)
    assert [v["finetuning"] for v in versions.json()["items"]] == ["standard", "linear"]
    weights = client.get(f"/v1/models/{tenant.model_id}/versions/2/weights", headers=tenant.headers)
    assert weights.status_code == 200
    report = client.get(f"/v1/unlearning-jobs/{job['id']}/report", headers=tenant.headers).json()
    assert (
        hashlib.sha256(weights.content).hexdigest() == report["unlearned_model"]["weights_sha256"]
    )

    # What a user does with the download: load it as the tangent model and run it.
    path = tmp_path / "v2.safetensors"
    path.write_bytes(weights.content)
    assert checkpoint_finetuning(str(path)) == "linear"
    spec = ModelSpec(
        family="classifier",
        architecture=classifier.model_name,
        classes=list(classifier.classes),
        weights=str(path),
        image_size=classifier.input_size[-1],
    )
    served = load_linearized(spec)
    images = torch.randn(4, 3, spec.image_size, spec.image_size)
    original = load_model(spec.model_copy(update={"weights": str(classifier.weights_path)}))
    with torch.no_grad():
        assert not torch.allclose(served(images), original.module(images), atol=1e-4)

    # The next deletion on this version must be linear too.
    refused = client.post(
        "/v1/unlearning-jobs",
        json=job_body(tenant, model={"id": tenant.model_id, "version": 2}),
        headers=tenant.headers,
    )
    assert refused.status_code == 422, refused.text
    assert "linearized model" in refused.json()["error"]["message"]
