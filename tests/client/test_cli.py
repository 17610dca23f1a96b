"""The `negmerge-client` command (jobs, models, datasets, requests, config) driven through
click against a real service over HTTP. No workers run here, so jobs stay QUEUED unless they
are cancelled."""

from __future__ import annotations

import hashlib
import json
import stat
import threading

import pytest
import yaml
from click.testing import CliRunner, Result

from negmerge_client import ServiceClient
from negmerge_client.cli import main
from tests.app.conftest import ARCHITECTURE, CLASSES, model_body
from tests.app.jobs_driver import MET_TARGET, MISSED_TARGET, drive_to_success
from tests.client.live_service import free_port
from tests.client.test_client import zip_dataset

MISSING_JOB = "00000000-0000-0000-0000-000000000000"


@pytest.fixture
def config_file(tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    """A config file of the test's own, and no NEGMERGE_API_* from the environment."""
    path = tmp_path / "negmerge" / "config.toml"
    monkeypatch.setenv("NEGMERGE_CONFIG", str(path))
    for name in ("NEGMERGE_API_URL", "NEGMERGE_API_KEY", "NEGMERGE_REQUEST_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    return path


@pytest.fixture
def run(config_file):  # type: ignore[no-untyped-def]
    """run(*args, code=0, env=None): `negmerge-client ARGS`, checking the exit code."""
    runner = CliRunner()

    def invoke(*args: str, code: int = 0, env: dict[str, str] | None = None) -> Result:
        result = runner.invoke(main, list(args), env=env)
        assert result.exit_code == code, (result.stdout, result.stderr, result.exception)
        assert "Traceback" not in result.output
        return result

    return invoke


@pytest.fixture
def negmerge_client(run, service_url, caller):  # type: ignore[no-untyped-def]
    """Like `run`, with --api-url and --api-key of the live service and the caller's key."""

    def invoke(*args: str, code: int = 0) -> Result:
        return run(*args, "--api-url", service_url, "--api-key", caller.key, code=code)

    return invoke


@pytest.fixture
def service(service_url, caller):  # type: ignore[no-untyped-def]
    with ServiceClient(service_url, caller.key) as client:
        yield client


@pytest.fixture
def registered(service, weights_file, shapes_dir):  # type: ignore[no-untyped-def]
    model = service.register_model(model_body(weights_file))
    dataset = service.register_dataset("shapes", str(shapes_dir / "manifest.jsonl"))
    return model["id"], dataset["id"]


def job_flags(registered: tuple[str, str], forget: str = "circle") -> tuple[str, ...]:
    model_id, dataset_id = registered
    return ("--model", model_id, "--dataset", dataset_id, "--forget-classes", forget,
            "--preset", "tiny-classifier")  # fmt: skip


def one_line_error(result: Result) -> str:
    """The error a failed command printed: exactly one line on stderr."""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert result.stdout == ""
    return lines[0]


def test_models_register_list_versions_download(negmerge_client, weights_file, tmp_path):
    model_id = negmerge_client(
        "models",
        "register",
        "--name",
        "shapes-net",
        "--family",
        "classifier",
        "--architecture",
        ARCHITECTURE,
        "--classes",
        ",".join(CLASSES),
        "--weights-uri",
        str(weights_file),
        "--image-size",
        "32",
    ).stdout.strip()
    listed = json.loads(negmerge_client("models", "list", "--json").stdout)
    assert [(m["id"], m["classes"]) for m in listed] == [(model_id, CLASSES)]
    table = negmerge_client("models", "list").stdout
    assert model_id in table and "shapes-net" in table and "v1" in table

    sha256 = hashlib.sha256(weights_file.read_bytes()).hexdigest()
    assert sha256 in negmerge_client("models", "versions", model_id).stdout
    (version,) = json.loads(negmerge_client("models", "versions", model_id, "--json").stdout)
    assert version["weights_sha256"] == sha256

    downloaded = negmerge_client("models", "download", model_id, "-o", str(tmp_path))
    path = tmp_path / f"{model_id}-v1.safetensors"
    assert downloaded.stdout.strip() == str(path)
    assert "sha256 verified" in downloaded.stderr
    assert hashlib.sha256(path.read_bytes()).hexdigest() == sha256

    # A folder that does not exist yet, written as the README does: "./weights/".
    into = negmerge_client("models", "download", model_id, "-o", f"{tmp_path}/weights/")
    path = tmp_path / "weights" / f"{model_id}-v1.safetensors"
    assert into.stdout.strip() == str(path)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == sha256
    # A file name is a file.
    named = negmerge_client(
        "models", "download", model_id, "-o", str(tmp_path / "base.safetensors")
    )
    assert named.stdout.strip() == str(tmp_path / "base.safetensors")


def test_models_register_from_a_yaml_body_with_a_flag_on_top(
    negmerge_client, weights_file, tmp_path
):
    body_file = tmp_path / "model.yaml"
    body_file.write_text(yaml.safe_dump(model_body(weights_file, name="from-yaml")))
    result = negmerge_client(
        "models", "register", "-f", str(body_file), "--name", "renamed", "--json"
    )
    assert json.loads(result.stdout)["name"] == "renamed"
    # the same name again: the service's 409, in one line
    error = one_line_error(
        negmerge_client("models", "register", "-f", str(body_file), "--name", "renamed", code=1)
    )
    assert error.startswith("Error: 409 conflict: name:") and "renamed" in error


def test_download_that_does_not_match_its_sha256_keeps_nothing(
    negmerge_client, service, weights_file, data_root, tmp_path
):
    weights = data_root / "weights" / f"cli-tampered-{tmp_path.name}.safetensors"
    weights.write_bytes(weights_file.read_bytes())
    model = service.register_model(model_body(weights, name="tampered"))
    weights.write_bytes(weights_file.read_bytes() + b"\0")  # changed after registration
    out = tmp_path / "out"
    out.mkdir()
    error = one_line_error(
        negmerge_client("models", "download", model["id"], "-o", str(out), code=1)
    )
    assert "sha256" in error and "nothing was kept" in error
    assert list(out.iterdir()) == []
    weights.unlink()


def test_datasets_register_and_upload(negmerge_client, registered, shapes_dir, tmp_path):
    model_id, _ = registered
    registered_id = negmerge_client(
        "datasets",
        "register",
        "--name",
        "shapes-again",
        "--manifest-uri",
        str(shapes_dir / "manifest.jsonl"),
        "--model",
        model_id,
    ).stdout.strip()
    upload = negmerge_client("datasets", "upload", str(zip_dataset(tmp_path)), "--name", "uploaded")
    uploaded_id = upload.stdout.strip()
    assert "18 samples" in upload.stderr
    listed = {d["id"]: d for d in json.loads(negmerge_client("datasets", "list", "--json").stdout)}
    assert {registered_id, uploaded_id} <= set(listed)
    assert listed[uploaded_id]["source"] == "upload"
    assert listed[registered_id]["labels"] == CLASSES
    assert "uploaded" in negmerge_client("datasets", "list").stdout


def test_jobs_submit_get_list_cancel_report(negmerge_client, registered, tmp_path):
    model_id, dataset_id = registered
    flags = (*job_flags(registered), "--subject-reference", "DSR-9")
    first = negmerge_client("jobs", "submit", *flags, "--idempotency-key", "once").stdout.strip()
    again = negmerge_client("jobs", "submit", *flags, "--idempotency-key", "once").stdout.strip()
    assert again == first

    ids = tmp_path / "ids.txt"
    ids.write_text("# two samples\nsquare-0\n\nsquare-1\n")
    body = tmp_path / "job.yaml"
    body.write_text(
        yaml.safe_dump(
            {
                "model": {"id": model_id},
                "forget": {"dataset_id": dataset_id},
                "variants": {"preset": "tiny-classifier"},
            }
        )
    )
    second = negmerge_client(
        "jobs", "submit", "-f", str(body), "--forget-ids-file", str(ids), "--json"
    )
    second = json.loads(second.stdout)
    assert second["forget"]["count"] == 2 and second["state"] == "QUEUED"

    shown = negmerge_client("jobs", "get", first).stdout
    assert first in shown and "QUEUED" in shown and "DSR-9" in shown and "6 samples" in shown
    assert json.loads(negmerge_client("jobs", "get", first, "--json").stdout)["id"] == first
    listed = json.loads(negmerge_client("jobs", "list", "--json").stdout)
    assert [j["id"] for j in listed] == [second["id"], first]
    assert len(json.loads(negmerge_client("jobs", "list", "--limit", "1", "--json").stdout)) == 1

    assert negmerge_client("jobs", "cancel", first).stdout.strip() == f"job {first} CANCELLED"
    table = negmerge_client("jobs", "list", "--state", "CANCELLED").stdout
    assert first in table and second["id"] not in table
    report = negmerge_client("jobs", "report", first).stdout
    assert "Unlearning report" in report and "CANCELLED (final)" in report
    assert "classes circle" in report and "DSR-9" in report
    assert "of data set 'shapes'" in report and "signature    Ed25519 by key" in report
    raw = json.loads(negmerge_client("jobs", "report", first, "--json").stdout)
    assert raw["final"] is True and raw["forget_selection"]["classes"] == ["circle"]

    error = one_line_error(negmerge_client("jobs", "cancel", first, code=1))
    assert error.startswith("Error: 409 conflict: ")


def test_submit_names_the_field_at_fault(negmerge_client, registered, tmp_path):
    result = negmerge_client("jobs", "submit", *job_flags(registered, forget="x"), code=1)
    error = one_line_error(result)
    assert error.startswith("Error: 422 invalid_request: forget.classes") and "'x'" in error
    broken = tmp_path / "job.yaml"
    broken.write_text("model: [unclosed\n")
    assert "job.yaml" in negmerge_client("jobs", "submit", "-f", str(broken), code=2).stderr


def test_wait_on_a_cancelled_job_exits_non_zero(negmerge_client, registered):
    job = negmerge_client("jobs", "submit", *job_flags(registered)).stdout.strip()
    negmerge_client("jobs", "cancel", job)
    error = one_line_error(negmerge_client("jobs", "wait", job, "--timeout", "30", code=3))
    assert error == f"Error: job {job} was CANCELLED"


def test_wait_exits_0_when_the_target_is_met_and_5_when_it_is_not(
    app, negmerge_client, registered, tmp_path
):  # type: ignore[no-untyped-def]
    model_id, dataset_id = registered
    outcomes = {}
    for name, target, grid in (
        ("met", MET_TARGET, None),
        ("missed", MISSED_TARGET, None),
        ("lambda 0", MET_TARGET, [0.0]),
    ):
        body = tmp_path / f"{name}.yaml"
        body.write_text(yaml.safe_dump({"target": target, "allow_repeat": True}))
        job = negmerge_client(
            "jobs", "submit", "-f", str(body), *job_flags(registered)
        ).stdout.strip()
        drive_to_success(app, job, grid=grid)  # a worker's work, done here
        outcomes[name] = job

    met = negmerge_client("jobs", "wait", outcomes["met"], "--timeout", "30")
    assert "SUCCEEDED, met: forget accuracy 25.00" in met.stdout and "version 2" in met.stdout

    missed = one_line_error(
        negmerge_client("jobs", "wait", outcomes["missed"], "--timeout", "30", code=5)
    )
    assert "SUCCEEDED but its target was NOT MET" in missed
    assert "forget accuracy 25.00 (must be <= 0)" in missed

    unchanged = one_line_error(
        negmerge_client("jobs", "wait", outcomes["lambda 0"], "--timeout", "30", code=5)
    )
    assert "no new version" in unchanged and "nothing was forgotten" in unchanged

    shown = negmerge_client("jobs", "get", outcomes["missed"]).stdout
    assert "NOT MET: forget accuracy 25.00 (must be <= 0)" in shown
    report = negmerge_client("jobs", "report", outcomes["missed"]).stdout
    assert "target       forget_acc_max 0" in report and "NOT MET" in report
    assert "NO  forget test accuracy 40.00 (must be <= 0)" in report


def test_submit_and_wait_follows_the_job_until_it_is_cancelled(
    negmerge_client, service, registered
):
    def cancel_queued() -> None:
        for job in service.list_jobs("QUEUED"):
            service.cancel_job(job["id"])

    canceller = threading.Timer(1.5, cancel_queued)  # someone cancels it while we wait
    canceller.start()
    try:
        result = negmerge_client(
            "jobs", "submit", *job_flags(registered), "--wait", "--timeout", "30", code=3
        )
    finally:
        canceller.join()
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("submitted job ")
    assert "QUEUED  0%  variants 0/" in lines[1]  # progress, one line a change off a terminal
    assert lines[-1].endswith("was CANCELLED")


def test_wait_gives_up_after_its_timeout(negmerge_client, registered):
    job = negmerge_client("jobs", "submit", *job_flags(registered)).stdout.strip()
    result = negmerge_client("jobs", "wait", job, "--timeout", "0.5", code=4)
    assert result.stderr.strip().splitlines()[-1].endswith(f"job {job} is still QUEUED after 0.5 s")


def test_bad_key_unknown_job_and_service_down_are_one_line_errors(
    run, negmerge_client, service_url
):
    error = one_line_error(
        run("jobs", "list", "--api-url", service_url, "--api-key", "nmk_nope", code=1)
    )
    assert error.startswith("Error: 401 unauthenticated: ")

    error = one_line_error(negmerge_client("jobs", "get", MISSING_JOB, code=1))
    assert error.startswith("Error: 404 not_found: ") and MISSING_JOB in error

    down = f"http://127.0.0.1:{free_port()}"
    error = one_line_error(run("jobs", "get", MISSING_JOB, "--api-url", down, code=1))
    assert f"cannot reach the NegMerge service at {down}: connection refused" in error


def test_config_precedence_flags_then_environment_then_file(
    run,
    service_url,
    caller,
    config_file,
):
    down = f"http://127.0.0.1:{free_port()}"
    run("config", "set", "api_url", service_url)
    run("config", "set", "api_key", "nmk_wrong")
    assert stat.S_IMODE(config_file.stat().st_mode) == 0o600
    assert caller.key not in config_file.read_text()

    # the file alone: its (wrong) key is used
    assert "401 unauthenticated" in run("jobs", "list", code=1).stderr
    # the environment beats the file
    good_env = {"NEGMERGE_API_KEY": caller.key}
    assert json.loads(run("jobs", "list", "--json", env=good_env).stdout) == []
    assert (
        "cannot reach"
        in run("jobs", "list", env={**good_env, "NEGMERGE_API_URL": down}, code=1).stderr
    )
    # flags beat the environment
    assert "401" in run("jobs", "list", "--api-key", "nmk_wrong", env=good_env, code=1).stderr
    run("jobs", "list", "--api-url", service_url, env={**good_env, "NEGMERGE_API_URL": down})

    run("config", "set", "api_key", caller.key)
    assert json.loads(run("jobs", "list", "--json").stdout) == []
    shown = run("config", "show", env={"NEGMERGE_API_URL": down}).stdout
    assert f"{down}  (NEGMERGE_API_URL)" in shown
    assert f"({config_file})" in shown and caller.key not in shown
    run("config", "unset", "api_url")
    assert "http://127.0.0.1:8000  (default)" in run("config", "show").stdout
    assert (
        "must start with http" in run("config", "set", "api_url", "localhost:8000", code=1).stderr
    )


def test_a_key_made_by_negmerge_admin_works_for_the_client(admin, run, service_url):
    admin("tenants", "create", "initech")
    assert "initech" in admin("tenants", "list").stdout
    created = admin("keys", "create", "--tenant", "initech", "--scopes", "jobs:read", "--json")
    key = json.loads(created.stdout)["key"]
    listed = run("jobs", "list", "--json", "--api-url", service_url, "--api-key", key)
    assert json.loads(listed.stdout) == []
    error = one_line_error(
        run("models", "register", "--name", "m", "--api-url", service_url, "--api-key", key, code=1)
    )
    assert error.startswith("Error: 403 forbidden: ")


def test_requests_submit_list_show(negmerge_client, registered):
    model_id, dataset_id = registered
    flags = ("--model", model_id, "--dataset", dataset_id, "--id", "circle-0", "--id",
             "circle-1", "--subject", "DSR-5", "--legal-basis", "GDPR Art. 17")  # fmt: skip
    made = negmerge_client("requests", "submit", *flags)
    request_id = made.stdout.strip()
    assert "received, due" in made.stderr
    again = negmerge_client("requests", "submit", *flags)
    assert again.stdout.strip() == request_id and "duplicate" in again.stderr
    table = negmerge_client("requests", "list", "--state", "PENDING").stdout
    assert request_id in table and "DSR-5" in table
    shown = json.loads(negmerge_client("requests", "show", request_id).stdout)
    assert shown["state"] == "PENDING" and shown["ids"] == ["circle-0", "circle-1"]
