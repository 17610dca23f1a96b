"""The migrations and the models agree, on PostgreSQL and on the embedded SQLite default."""

from __future__ import annotations

import base64
import json

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, func, select

from app.db.models import Base, UnlearningJob
from app.db.session import make_engine
from app.main import create_app
from app.services.tenants import create_key, create_tenant
from app.settings import Settings
from tests.app.conftest import job_body, model_body
from tests.conftest import alembic_config


def differences(url: str) -> list:
    engine = make_engine(url, pool_size=1)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            return compare_metadata(context, Base.metadata)
    finally:
        engine.dispose()


def test_postgres_schema_matches_the_models(postgres_url):
    # The session's database was brought to head by `alembic upgrade head`.
    assert differences(postgres_url) == []


def test_sqlite_upgrade_head_matches_and_downgrade_empties(tmp_path):
    url = f"sqlite:///{tmp_path / 'negmerge.db'}"
    command.upgrade(alembic_config(url), "head")
    assert differences(url) == []
    command.downgrade(alembic_config(url), "base")
    engine = create_engine(url)
    with engine.connect() as connection:
        tables = connection.exec_driver_sql("SELECT name FROM sqlite_master WHERE type='table'")
        assert {row[0] for row in tables} == {"alembic_version"}
    engine.dispose()


def test_the_embedded_default_runs_the_same_code(tmp_path, weights_file, shapes_dir, data_root):
    """SQLite and the filesystem broker: register, submit twice with one key, one message."""
    url = f"sqlite:///{tmp_path / 'negmerge.db'}"
    command.upgrade(alembic_config(url), "head")
    settings = Settings(
        database_url=url,
        broker_folder=str(tmp_path / "broker"),
        artifact_root=str(tmp_path / "artifacts"),
        data_roots=[str(data_root)],
    )
    app = create_app(settings)
    with app.state.db.unit_of_work() as session:
        _, key = create_key(session, create_tenant(session, "solo", "test"), ["admin"], "k", "t")
    headers = {"Authorization": f"Bearer {key}", "Idempotency-Key": "once"}
    with TestClient(app) as client:
        model = client.post("/v1/models", json=model_body(weights_file), headers=headers).json()
        dataset = client.post(
            "/v1/datasets", json={"name": "s", "manifest_uri": str(shapes_dir)}, headers=headers
        ).json()

        class Registered:
            model_id, dataset_id = model["id"], dataset["id"]

        first = client.post("/v1/unlearning-jobs", json=job_body(Registered), headers=headers)
        again = client.post("/v1/unlearning-jobs", json=job_body(Registered), headers=headers)
        assert first.status_code == again.status_code == 202, first.text
        assert first.json()["id"] == again.json()["id"]
        assert client.get("/readyz").json()["checks"] == {"database": "ok", "broker": "ok"}
    with app.state.db.unit_of_work() as session:
        assert session.scalar(select(func.count()).select_from(UnlearningJob)) == 1
    messages = list((tmp_path / "broker" / "queue").glob("*.msg"))
    assert len(messages) == 1
    envelope = json.loads(messages[0].read_text())
    args, _kwargs, _embed = json.loads(base64.b64decode(envelope["body"]))
    assert args == [first.json()["id"], "prepare"]
    app.state.db.dispose()


def _job_with_result(url: str, result: dict) -> None:
    """One tenant, model, version 1, data set and job storing `result`, at head."""
    from sqlalchemy.orm import Session

    from app.db.models import Dataset, Model, ModelVersion, Tenant

    engine = create_engine(url)
    with Session(engine) as session, session.begin():
        tenant = Tenant(name="acme")
        session.add(tenant)
        session.flush()
        model = Model(tenant_id=tenant.id, name="m", family="classifier", architecture="a",
                      classes=["x"], spec={})  # fmt: skip
        session.add(model)
        session.flush()
        version = ModelVersion(tenant_id=tenant.id, model_id=model.id, version=1,
                               weights_uri="/w", weights_sha256="a" * 64, size_bytes=1)  # fmt: skip
        dataset = Dataset(tenant_id=tenant.id, name="d", source="uri", manifest_uri="/m",
                          root_uri="/", manifest_sha256="m" * 64, content_sha256="c" * 64,
                          sample_count=1, labels=["x"], split_counts={})  # fmt: skip
        session.add_all([version, dataset])
        session.flush()
        session.add(
            UnlearningJob(
                tenant_id=tenant.id,
                model_id=model.id,
                model_version_id=version.id,
                forget_dataset_id=dataset.id,
                variants_total=1,
                request={},
                spec={},
                forget_manifest_sha256="f" * 64,
                forget_count=1,
                request_sha256="r" * 64,
                result=result,
            )  # fmt: skip
        )
    engine.dispose()


def _stored_result(url: str) -> dict:
    engine = create_engine(url)
    with engine.connect() as connection:
        stored = connection.execute(select(UnlearningJob.result)).scalar_one()
    engine.dispose()
    return stored


def _down_to_before(config, revision: str) -> None:  # type: ignore[no-untyped-def]
    """Down to the revision before `revision` only: the data rows stay valid there."""
    before = ScriptDirectory.from_config(config).get_revision(revision).down_revision
    command.downgrade(config, before)


def test_0009_makes_stored_results_name_the_base_versions_weights(tmp_path):
    """Results stored before 0009 named the worker's working copy as base_model_sha256; the
    migration keeps it as base_copy_sha256 and names the version's weights instead."""
    url = f"sqlite:///{tmp_path / 'negmerge.db'}"
    config = alembic_config(url)
    command.upgrade(config, "head")
    _job_with_result(url, {"base_model_sha256": "b" * 64, "lambda": 0.5})
    command.downgrade(config, "0010_device_usage")  # 0011 leaves this result as it is
    _down_to_before(config, "0009_evidence")
    command.upgrade(config, "0009_evidence")
    assert _stored_result(url) == {
        "base_model_sha256": "a" * 64,
        "base_copy_sha256": "b" * 64,
        "lambda": 0.5,
    }


def test_0011_stores_one_shape_of_result_and_reads_as_a_job_result(tmp_path):
    """Results stored before 0011 carried model_version and metrics_before/after (older ones
    only those); 0011 keeps `model` and `metrics` alone, which JobResult reads, and its
    downgrade puts the copies back."""
    from app.schemas.results import JobResult

    url = f"sqlite:///{tmp_path / 'negmerge.db'}"
    config = alembic_config(url)
    command.upgrade(config, "head")
    before, after = {"forget_acc": 90.0}, {"forget_acc": 5.0}
    _job_with_result(
        url,
        {"model_version": 1, "lambda": 0.5, "metrics_before": before, "metrics_after": after},
    )
    _down_to_before(config, "0011_job_result")
    command.upgrade(config, "0011_job_result")
    stored = _stored_result(url)
    assert not {"model_version", "metrics_before", "metrics_after"} & stored.keys()
    assert stored["metrics"] == {"before": before, "after": after}
    assert (stored["model"]["version"], stored["model"]["weights_sha256"]) == (1, "a" * 64)
    result = JobResult.of(stored)
    assert result.model.version == 1 and result.metrics.after == after and result.lambda_ == 0.5
    _down_to_before(config, "0011_job_result")
    downgraded = _stored_result(url)
    assert downgraded["model_version"] == 1 and downgraded["metrics_after"] == after
