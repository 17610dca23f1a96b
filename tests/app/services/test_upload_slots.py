"""The per-process upload slots of the embedded setup (SQLite); PostgreSQL's advisory-lock
slots are exercised through the API in tests/app/api/test_datasets.py."""

from __future__ import annotations

import uuid

from sqlalchemy import create_engine
from sqlalchemy.orm import Session

from app.services.upload_slots import upload_slot


def test_sqlite_slots_are_counted_per_tenant_and_freed_on_exit(tmp_path):
    engine = create_engine(f"sqlite:///{tmp_path / 'slots.db'}")
    tenant, other = uuid.uuid4(), uuid.uuid4()
    with Session(engine) as a, Session(engine) as b, Session(engine) as c:
        with upload_slot(a, tenant, 2) as first, upload_slot(b, tenant, 2) as second:
            assert first and second
            with upload_slot(c, tenant, 2) as third, upload_slot(c, other, 2) as elsewhere:
                assert not third and elsewhere
        with upload_slot(c, tenant, 1) as again:
            assert again  # both were released when their blocks ended
        try:
            with upload_slot(a, tenant, 1):
                raise RuntimeError("the upload failed")
        except RuntimeError:
            pass
        with upload_slot(b, tenant, 1) as after_failure:
            assert after_failure
    engine.dispose()
