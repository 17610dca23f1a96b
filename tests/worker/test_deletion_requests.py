"""Deletion requests end to end: a window policy, run by the watchdog's periodic check,
batches two subjects' requests into one job that real workers carry out; each request ends
FORGOTTEN with its own samples' numbers before and after, in the version that carries both."""

from __future__ import annotations

import json
import time

import pytest

from tests.worker.conftest import TWO_VARIANTS, register_tenant, wait_for


@pytest.fixture(scope="module")
def worker(start_worker, watchdog):  # type: ignore[no-untyped-def]
    process = start_worker("requests")
    yield process
    process.stop()


def test_a_window_batch_runs_and_each_request_keeps_its_evidence(client, db, classifier, worker):
    tenant = register_tenant(client, db, classifier)
    rows = [json.loads(line) for line in
            (classifier.dataset_root / "manifest.jsonl").read_text().splitlines()]  # fmt: skip
    threes = [r["id"] for r in rows if r["label"] == "three" and r.get("split", "train") == "train"]
    policy = client.put(
        f"/v1/models/{tenant.model_id}/deletion-policy",
        json={"mode": "window", "window_seconds": 1,
              "job": {"variants": TWO_VARIANTS, "max_eval_samples": 64,
                      "search": {"grid": [0.0, 1.0], "max_extensions": 0, "retain_ratio": 0.01},
                      "target": {"forget_acc_max": 100.0, "retain_ratio": 0.01}}},
        headers=tenant.headers,
    )  # fmt: skip
    assert policy.status_code == 200, policy.text
    made = [
        client.post(
            "/v1/deletion-requests",
            json={"model_id": tenant.model_id, "dataset_id": tenant.dataset_id, "ids": ids,
                  "subject_reference": ref},
            headers=tenant.headers,
        ).json()
        for ref, ids in (("DSR-A", threes[:4]), ("DSR-B", threes[4:10]))
    ]  # fmt: skip

    def request(i: int) -> dict:
        url = f"/v1/deletion-requests/{made[i]['id']}"
        return client.get(url, headers=tenant.headers).json()

    deadline = time.monotonic() + 30
    while request(0)["state"] == "PENDING":  # the watchdog batches them a second later
        assert time.monotonic() < deadline, request(0)
        time.sleep(0.2)
    job_id = request(0)["job_id"]
    assert request(1)["job_id"] == job_id
    job = wait_for(client, tenant, job_id, timeout=400)
    assert job["state"] == "SUCCEEDED", job
    assert job["forget"]["count"] == 10
    # The requests follow the job's verdict (a lambda the search sets to 0 is never met).
    met = job["verdict"]["met"]
    version = job["result"]["model"]["version"]

    for i, count in ((0, 4), (1, 6)):
        settled = request(i)
        assert settled["state"] == ("FORGOTTEN" if met else "NOT_FORGOTTEN"), (settled, job)
        assert settled["model_version"] == version
        evidence = settled["evidence"]
        assert evidence["before"]["count"] == evidence["after"]["count"] == count
        for moment in ("before", "after"):
            assert 0 <= evidence[moment]["acc"] <= 100
            assert 0 < evidence[moment]["true_label_confidence"] <= 100
        # The group's numbers are the job's own, per request.
        assert job["result"]["groups"][made[i]["id"]] == evidence
    if version is not None:
        carried = client.get(
            f"/v1/models/{tenant.model_id}/versions/{version}", headers=tenant.headers
        ).json()["deletion_requests"]
        assert carried == [made[0]["id"], made[1]["id"]]
