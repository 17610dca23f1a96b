"""`negmerge admin ...`, through the library's `negmerge` command (attached by entry point)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from sqlalchemy import text

from app.settings import get_settings
from negmerge.cli import main
from tests.app.conftest import job_body


@pytest.fixture
def admin(db, settings, monkeypatch):  # type: ignore[no-untyped-def]
    """Runs `negmerge admin ARGS` against the test database."""
    monkeypatch.setenv("NEGMERGE_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("NEGMERGE_REPORT_SIGNING_KEY_FILE", settings.report_signing_key_file)
    get_settings.cache_clear()
    runner = CliRunner()

    def run(*args: str, code: int = 0):  # type: ignore[no-untyped-def]
        result = runner.invoke(main, ["admin", *args])
        assert result.exit_code == code, result.output
        return result

    yield run
    get_settings.cache_clear()


def test_create_tenant_and_key_then_call_the_api(admin, client):
    admin("tenants", "create", "globex")
    assert "globex" in admin("tenants", "list").output
    admin("tenants", "create", "globex", code=1)
    created = json.loads(
        admin("keys", "create", "--tenant", "globex", "--scopes", "jobs:read", "--json").output
    )
    assert created["scopes"] == ["jobs:read"]
    headers = {"Authorization": f"Bearer {created['key']}"}
    assert client.get("/v1/unlearning-jobs", headers=headers).status_code == 200
    assert client.post("/v1/unlearning-jobs", json={}, headers=headers).status_code == 403
    admin("keys", "create", "--tenant", "globex", "--scopes", "root", code=1)
    admin("keys", "revoke", created["id"])
    assert client.get("/v1/unlearning-jobs", headers=headers).status_code == 401


def test_keys_have_names_and_are_listed(admin):
    admin("tenants", "create", "initech")
    ci = json.loads(
        admin(
            "keys", "create", "--tenant", "initech", "--scopes", "jobs:write", "--name", "ci",
            "--json",
        ).output
    )  # fmt: skip
    auditor = json.loads(
        admin("keys", "create", "--tenant", "initech", "--scopes", "audit:read", "--json").output
    )
    assert (ci["name"], auditor["name"]) == ("ci", "audit:read")  # unnamed: its scopes
    admin("keys", "revoke", auditor["id"])

    lines = admin("keys", "list", "--tenant", "initech").output.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(ci["id"]) and "  ci  jobs:write  " in lines[0]
    assert lines[0].endswith("active") and ci["key"][:12] in lines[0]
    assert lines[1].startswith(auditor["id"]) and "revoked" in lines[1]
    assert ci["key"] not in admin("keys", "list", "--tenant", "initech").output
    listed = json.loads(admin("keys", "list", "--tenant", "initech", "--json").output)
    assert [(k["name"], k["revoked_at"] is None) for k in listed] == [
        ("ci", True),
        ("audit:read", False),
    ]
    admin("keys", "list", "--tenant", "nobody", code=1)


TAMPERING = {
    "edited": (
        'UPDATE audit_log SET details = \'{"name": "someone else"}\' '
        "WHERE chain = :chain AND seq = 2",
        "was edited",
    ),
    "deleted": ("DELETE FROM audit_log WHERE chain = :chain AND seq = 2", "rows are missing"),
    "newest deleted": (
        "DELETE FROM audit_log WHERE chain = :chain AND seq = "
        "(SELECT max(seq) FROM audit_log WHERE chain = :chain)",
        "newest rows",
    ),
    "reattributed": (
        "UPDATE audit_log SET actor = 'api_key:innocent' WHERE chain = :chain AND seq = 3",
        "was edited",
    ),
}


@pytest.mark.parametrize("how", list(TAMPERING))
def test_audit_verify_detects_tampering(admin, client, registered, db, how):
    client.post("/v1/unlearning-jobs", json=job_body(registered), headers=registered.caller.headers)
    verified = admin("audit", "verify")
    chain = str(registered.caller.tenant_id)
    assert f"{chain}  4 entries" in verified.output and "BROKEN" not in verified.output

    statement, words = TAMPERING[how]
    with db.engine.begin() as connection:
        assert connection.execute(text(statement), {"chain": chain}).rowcount == 1
    broken = admin("audit", "verify", code=1)
    assert "BROKEN" in broken.output and words in broken.output


def test_a_filed_report_verifies_offline_and_a_tampered_one_is_refused(
    admin, app, client, registered, tmp_path
):  # type: ignore[no-untyped-def]
    from tests.app.jobs_driver import MET_TARGET, drive_to_success, submit

    job_id = submit(client, registered, target=MET_TARGET)
    drive_to_success(app, job_id)
    filed = tmp_path / "report.json"
    response = client.get(f"/v1/unlearning-jobs/{job_id}/report", headers=registered.caller.headers)
    filed.write_bytes(response.content)  # the file exactly as downloaded
    public_key = tmp_path / "service.pem"
    printed = admin("report", "public-key")
    public_key.write_text(printed.stdout)
    assert "key id" in printed.stderr
    assert public_key.read_text() == client.get("/v1/report-signing-key").json()["public_key_pem"]

    for args in ((str(filed),), (str(filed), "--public-key", str(public_key))):
        verified = admin("report", "verify", *args)
        assert verified.output.startswith("valid") and job_id in verified.output

    report = json.loads(filed.read_text())
    report["requested_by"]["api_key_name"] = "someone else"
    tampered = tmp_path / "tampered.json"
    tampered.write_text(json.dumps(report, indent=2))
    refused = admin("report", "verify", str(tampered), "--public-key", str(public_key), code=1)
    assert "INVALID" in refused.output and "altered" in refused.output

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    stranger = tmp_path / "stranger.pem"
    stranger.write_bytes(
        Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    other_key = admin("report", "verify", str(filed), "--public-key", str(stranger), code=1)
    assert "not by this public key" in other_key.output
    not_json = tmp_path / "notes.txt"
    not_json.write_text("hello")
    assert "not a JSON report" in admin("report", "verify", str(not_json), code=1).output


def test_versions_keep_finds_the_models_tenant_and_records_the_reason(admin, client, registered):
    model = registered.model_id
    kept = admin("versions", "keep", model, "1", "--reason", "legal hold LH-7")
    assert "kept version 1" in kept.output
    version = client.get(f"/v1/models/{model}/versions/1", headers=registered.caller.headers)
    assert version.json()["kept_reason"] == "legal hold LH-7"
    unknown = admin("versions", "keep", "00000000-0000-4000-8000-000000000000", "1",
                    "--reason", "x", code=1)  # fmt: skip
    assert "no model" in unknown.output
