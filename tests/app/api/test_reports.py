"""The evidence report through the API: names, units, hashes that agree with the job
resource, the audit chain's head at the end, and an Ed25519 signature that verifies against
the served public key."""

from __future__ import annotations

import base64
import copy

import pytest
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from app.services.report_signing import SignatureProblem, canonical_bytes, verify
from tests.app.conftest import job_body
from tests.app.jobs_driver import MET_TARGET, drive_to_success, submit


def test_a_finished_jobs_report_names_everything_and_agrees_with_the_job(
    app, client, registered, caller
):  # type: ignore[no-untyped-def]
    job_id = submit(client, registered, target=MET_TARGET)
    drive_to_success(app, job_id)
    headers = caller.headers
    job = client.get(f"/v1/unlearning-jobs/{job_id}", headers=headers).json()
    response = client.get(f"/v1/unlearning-jobs/{job_id}/report", headers=headers)
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    report = response.json()
    result = job["result"]

    who = report["requested_by"]
    assert (who["tenant_id"], who["tenant_name"]) == (str(caller.tenant_id), "acme")
    assert (who["api_key_id"], who["api_key_name"]) == (str(caller.key_id), "test")
    forgotten = report["forgotten"]
    assert (forgotten["dataset_id"], forgotten["dataset_name"]) == (registered.dataset_id, "shapes")
    assert forgotten["ids"] == ["circle-0", "circle-1"] and forgotten["classes"] is None
    assert forgotten["manifest_sha256"] == job["forget"]["manifest_sha256"]
    base, unlearned = report["base_model"], report["unlearned_model"]
    assert (base["model_id"], base["model_name"], base["version"]) == (
        registered.model_id, "shapes-net", 1)  # fmt: skip
    assert (unlearned["model_name"], unlearned["version"]) == ("shapes-net", 2)

    # Every hash as the job resource has it; the base's is its version's weights (the file
    # a download gives), not the worker's working copy.
    version = client.get(f"/v1/models/{registered.model_id}/versions/1", headers=headers).json()
    assert result["base_model_sha256"] == version["weights_sha256"] == base["weights_sha256"]
    assert result["base_copy_sha256"] != result["base_model_sha256"]
    assert report["hashes"] == {
        "forget_manifest_sha256": job["forget"]["manifest_sha256"],
        "base_model_sha256": result["base_model_sha256"],
        "task_vector_sha256": result["task_vector_sha256"],
        "merged_sha256": result["merged_sha256"],
        "unlearned_model_sha256": result["model"]["weights_sha256"],
    }
    assert len(report["hashes"]["task_vector_sha256"]) == job["progress"]["variants_total"]
    assert report["kept_fraction"] == result["kept_fraction"] == 0.4321
    assert report["lambda"] == result["lambda"] and report["metrics"] == result["metrics"]
    assert report["verdict"] == job["verdict"] and report["verdict"]["met"] is True

    # Units: every number's, by path, in words.
    units = report["units"]
    assert "percent" in units["metrics.*.*_acc"] and "percent" in units["metrics.*.mia"]
    assert "fraction" in units["kept_fraction"]

    # The audit chain's head at the end: the entry of the job's terminal state.
    trail = report["audit"]
    assert trail["chain"] == str(caller.tenant_id)
    entries = client.get(
        "/v1/audit", params={"resource_id": job_id, "page_size": 200}, headers=headers
    ).json()["items"]
    last = entries[0]  # newest first
    assert last["action"] == "job.state_changed" and last["details"]["to"] == "SUCCEEDED"
    assert (trail["head_seq_at_end"], trail["head_hash_at_end"]) == (last["seq"], last["hash"])
    assert trail["entries"] == f"/v1/audit?resource_id={job_id}"

    # Signed, with the key the service serves (no API key needed to fetch it).
    key = client.get("/v1/report-signing-key")
    assert key.status_code == 200, key.text
    served = key.json()
    signature = report["signature"]
    assert signature["algorithm"] == served["algorithm"] == "Ed25519"
    assert signature["key_id"] == served["key_id"]
    public_key = load_pem_public_key(served["public_key_pem"].encode())
    public_key.verify(base64.b64decode(signature["value"]), canonical_bytes(report))
    assert verify(report, public_key) == served["key_id"]


def test_a_tampered_report_does_not_verify(app, client, registered, caller):  # type: ignore[no-untyped-def]
    job_id = submit(client, registered, target=MET_TARGET)
    drive_to_success(app, job_id)
    report = client.get(f"/v1/unlearning-jobs/{job_id}/report", headers=caller.headers).json()
    public_key = load_pem_public_key(
        client.get("/v1/report-signing-key").json()["public_key_pem"].encode()
    )
    edited = copy.deepcopy(report)
    edited["metrics"]["after"]["forget_acc"] = 0.0
    with pytest.raises(SignatureProblem, match="altered"):
        verify(edited, public_key)
    unsigned = {k: v for k, v in report.items() if k != "signature"}
    with pytest.raises(SignatureProblem, match="no signature"):
        verify(unsigned, public_key)


def test_an_unfinished_jobs_report_is_signed_but_not_final(client, registered, caller):  # type: ignore[no-untyped-def]
    headers = caller.headers
    job = client.post("/v1/unlearning-jobs", json=job_body(registered), headers=headers).json()
    report = client.get(f"/v1/unlearning-jobs/{job['id']}/report", headers=headers).json()
    assert report["final"] is False and report["state"] == "QUEUED"
    assert report["audit"]["head_seq_at_end"] is None and report["signature"]["value"]
    assert report["hashes"]["base_model_sha256"] == report["base_model"]["weights_sha256"]
    assert report["hashes"]["merged_sha256"] is None


def test_another_tenants_report_is_not_found(client, registered, make_caller):  # type: ignore[no-untyped-def]
    job = client.post(
        "/v1/unlearning-jobs", json=job_body(registered), headers=registered.caller.headers
    ).json()
    other = make_caller("globex", ("audit:read",))
    answer = client.get(f"/v1/unlearning-jobs/{job['id']}/report", headers=other.headers)
    assert answer.status_code == 404
