"""The migrations and the models agree, on PostgreSQL and on the embedded SQLite default."""

from __future__ import annotations

import base64
import json

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
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
