"""The service's tests run against the real PostgreSQL and Redis on 127.0.0.1.

A fresh database (negmerge_test_<random>) is created for the session and brought to the
current schema with `alembic upgrade head`; it is dropped at the end. Tests commit for real
(the concurrency tests need it) and every table is truncated after each test. If PostgreSQL
or Redis is down, the tests skip, except under CI=true, where they fail.
"""

from __future__ import annotations

import json
import secrets
import shutil
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
import timm
import torch
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import text

from app.db.models import Base
from app.db.session import Database
from app.main import create_app
from app.services.tenants import create_key, create_tenant
from app.settings import Settings
from negmerge.io import save_file
from tests.conftest import REDIS_URL

REPO = Path(__file__).resolve().parents[2]
CLASSES = ["circle", "square", "triangle"]
ARCHITECTURE = "test_resnet"  # timm's smallest ResNet
MiB = 1024 * 1024


@pytest.fixture(scope="session")
def service_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("service")


@pytest.fixture(scope="session")
def settings(postgres_url: str, redis_client: redis.Redis, service_root: Path) -> Settings:
    (service_root / "data").mkdir(exist_ok=True)
    return Settings(
        database_url=postgres_url,
        broker_url=REDIS_URL,
        queue_name=f"negmerge-test-{secrets.token_hex(4)}",
        broker_folder=str(service_root / "broker"),
        artifact_root=str(service_root / "artifacts"),
        data_roots=[str(service_root / "data")],
        max_body_bytes=64 * 1024,
        max_upload_bytes=2 * MiB,
        max_extracted_bytes=8 * MiB,
        max_compression_ratio=50,
        db_pool_size=10,
        report_signing_key_file=str(service_root / "keys" / "report-signing-key.pem"),
    )


@pytest.fixture(scope="session")
def app(settings: Settings, redis_client: redis.Redis):  # type: ignore[no-untyped-def]
    application = create_app(settings)
    yield application
    application.state.db.dispose()
    queue = settings.queue_name  # the queue and the bindings kombu keeps for it
    redis_client.delete(queue, f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}")


@pytest.fixture
def db(app, settings: Settings, redis_client: redis.Redis) -> Iterator[Database]:  # type: ignore[no-untyped-def]
    """The app's database; every table is emptied (and the queue drained, the artifact store
    emptied) after the test."""
    database: Database = app.state.db
    yield database
    shutil.rmtree(settings.artifact_root, ignore_errors=True)
    tables = ", ".join(f'"{t.name}"' for t in Base.metadata.sorted_tables)
    with database.engine.begin() as connection:
        connection.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
    redis_client.delete(settings.queue_name)


@pytest.fixture
def client(app, db: Database) -> Iterator[TestClient]:  # type: ignore[no-untyped-def]
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


@dataclass(frozen=True)
class Caller:
    tenant_id: uuid.UUID
    key_id: uuid.UUID
    key: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


@pytest.fixture
def make_caller(db: Database) -> Callable[..., Caller]:
    """make_caller(tenant_name, scopes) creates the tenant if needed and a key for it."""

    def make(tenant: str = "acme", scopes: tuple[str, ...] = ("admin",)) -> Caller:
        from app.services.tenants import find_tenant

        with db.unit_of_work() as session:
            try:
                row = find_tenant(session, tenant)
            except ValueError:
                row = create_tenant(session, tenant, "test")
            key_row, key = create_key(session, row, list(scopes), "test", "test")
            return Caller(row.id, key_row.id, key)

    return make


@pytest.fixture
def caller(make_caller: Callable[..., Caller]) -> Caller:
    return make_caller("acme", ("admin",))


# ---- data on disk ----------------------------------------------------------------------------


def write_image(path: Path, color: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), color).save(path, format="PNG")


def write_dataset(root: Path, per_class: int = 6, classes: list[str] = CLASSES) -> list[dict]:
    """A tiny data set: manifest.jsonl and PNGs, splits train / val / test."""
    rows = []
    for c, label in enumerate(classes):
        for i in range(per_class):
            split = "val" if i == per_class - 2 else "test" if i == per_class - 1 else "train"
            row = {"id": f"{label}-{i}", "path": f"{label}/{i}.png", "label": label, "split": split}
            write_image(root / row["path"], (40 * c, 10 * i, 100))
            rows.append(row)
    write_manifest(root, rows)
    return rows


def write_manifest(root: Path, rows: list[dict]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="session")
def data_root(settings: Settings) -> Path:
    return Path(settings.data_roots[0])


@pytest.fixture(scope="session")
def shapes_dir(data_root: Path) -> Path:
    root = data_root / "shapes"
    write_dataset(root)
    return root


@pytest.fixture(scope="session")
def weights_file(data_root: Path) -> Path:
    path = data_root / "weights" / "base.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    # Real weights of the architecture model_body names: registration checks that they fit.
    torch.manual_seed(0)
    save_file(timm.create_model(ARCHITECTURE, num_classes=len(CLASSES)).state_dict(), path)
    return path


def model_body(weights: Path, name: str = "shapes-net") -> dict:
    return {
        "name": name,
        "family": "classifier",
        "architecture": ARCHITECTURE,
        "classes": CLASSES,
        "weights_uri": str(weights),
        "image_size": 32,
    }


@dataclass(frozen=True)
class Registered:
    caller: Caller
    model_id: str
    dataset_id: str


@pytest.fixture
def register(client: TestClient, weights_file: Path, shapes_dir: Path) -> Callable[..., Registered]:
    """register(caller) registers a model and the shapes data set for the caller's tenant."""

    def run(caller: Caller) -> Registered:
        model = client.post("/v1/models", json=model_body(weights_file), headers=caller.headers)
        assert model.status_code == 201, model.text
        dataset = client.post(
            "/v1/datasets",
            json={"name": "shapes", "manifest_uri": str(shapes_dir / "manifest.jsonl")},
            headers=caller.headers,
        )
        assert dataset.status_code == 201, dataset.text
        return Registered(caller, model.json()["id"], dataset.json()["id"])

    return run


@pytest.fixture
def registered(register: Callable[..., Registered], caller: Caller) -> Registered:
    return register(caller)


def job_body(registered: Registered, **changes: object) -> dict:
    body: dict = {
        "model": {"id": registered.model_id},
        "forget": {"dataset_id": registered.dataset_id, "ids": ["circle-0", "circle-1"]},
        "variants": {"preset": "tiny-classifier"},
        "subject_reference": "DSR-1",
        "legal_basis": "GDPR Art. 17",
        # Tests submit one forget set many times; refusing repeats is tested on its own.
        "allow_repeat": True,
    }
    body.update(changes)
    return body
