"""API keys and scopes."""

from __future__ import annotations

import pytest

from app.services.tenants import revoke_key


def test_no_key_or_unknown_key_is_401(client):
    assert client.get("/v1/unlearning-jobs").status_code == 401
    response = client.get("/v1/unlearning-jobs", headers={"Authorization": "Bearer nmk_nope"})
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "unauthenticated"
    assert response.headers["WWW-Authenticate"] == "Bearer"


def test_x_api_key_header_works(client, caller):
    response = client.get("/v1/unlearning-jobs", headers={"X-API-Key": caller.key})
    assert response.status_code == 200


def test_revoked_key_is_401(client, caller, db):
    with db.unit_of_work() as session:
        revoke_key(session, caller.key_id, "test")
    assert client.get("/v1/unlearning-jobs", headers=caller.headers).status_code == 401


@pytest.mark.parametrize(
    ("scopes", "method", "path", "allowed"),
    [
        (("jobs:read",), "post", "/v1/unlearning-jobs", False),
        (("jobs:read",), "get", "/v1/unlearning-jobs", True),
        (("jobs:write",), "get", "/v1/unlearning-jobs", True),  # implies jobs:read
        (("jobs:write",), "get", "/v1/audit", False),
        (("audit:read",), "get", "/v1/audit", True),
        (("audit:read",), "get", "/v1/models", False),
        (("audit:read",), "get", "/v1/unlearning-jobs", True),  # auditors read the evidence
        (("audit:read",), "post", "/v1/unlearning-jobs", False),
        (("models:read",), "post", "/v1/models", False),
        (("jobs:read",), "get", "/v1/models", True),
        (("models:write",), "get", "/v1/datasets", True),
    ],
)
def test_scopes(client, make_caller, scopes, method, path, allowed):
    caller = make_caller("acme", scopes)
    response = getattr(client, method)(
        path, headers=caller.headers, **({"json": {}} if method == "post" else {})
    )
    if allowed:
        assert response.status_code == 200, response.text
    else:
        assert response.status_code == 403
        assert "scope" in response.json()["error"]["message"]
