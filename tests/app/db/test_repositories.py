"""The repositories' scoping: a tenant's repository never answers with another tenant's rows
(even for an id of the other tenant's), an audit chain's repository reads only its chain,
and the system's lookups (retention's work list, advisory locks) span every tenant."""

from __future__ import annotations

import uuid
from datetime import timedelta

from sqlalchemy.orm import Session

from app.db.base import utcnow
from app.db.models import (
    Dataset,
    JobState,
    Model,
    ModelVersion,
    Tenant,
    UnlearningJob,
)
from app.db.repositories import (
    AuditChainRepository,
    JobRepository,
    StepRepository,
    TenantRepository,
    audit_chains,
    try_transaction_lock,
)
from app.db.session import Database
from app.services import audit


def make_tenant(session: Session, name: str) -> Tenant:
    return TenantRepository(session).add(Tenant(name=name))


def make_model(session: Session, tenant: Tenant) -> tuple[ModelVersion, Dataset, Dataset]:
    """A model with one version, and two data sets, all the tenant's."""
    model = Model(tenant_id=tenant.id, name="m", family="timm", architecture="a", classes=[],
                  spec={})  # fmt: skip
    session.add(model)
    session.flush()
    version = ModelVersion(tenant_id=tenant.id, model_id=model.id, version=1, weights_uri="w",
                           weights_sha256="0" * 64, size_bytes=1)  # fmt: skip
    datasets = [make_dataset(tenant, name) for name in ("forget", "retain")]
    session.add_all([version, *datasets])
    session.flush()
    return version, datasets[0], datasets[1]


def make_dataset(tenant: Tenant, name: str) -> Dataset:
    return Dataset(tenant_id=tenant.id, name=name, source="uri", manifest_uri="m", root_uri="r",
                   manifest_sha256="0" * 64, content_sha256="0" * 64, sample_count=0, labels=[],
                   split_counts={})  # fmt: skip


def make_job(
    session: Session,
    tenant: Tenant,
    version: ModelVersion,
    forget: Dataset,
    retain: Dataset | None = None,
    state: JobState = JobState.QUEUED,
    **columns: object,
) -> UnlearningJob:
    job = UnlearningJob(tenant_id=tenant.id, model_id=version.model_id,
                        model_version_id=version.id, forget_dataset_id=forget.id,
                        retain_dataset_id=retain.id if retain else None, state=state,
                        variants_total=1, request={}, spec={}, forget_manifest_sha256="0" * 64,
                        forget_count=1, request_sha256="0" * 64, **columns)  # fmt: skip
    session.add(job)
    session.flush()
    return job


def test_active_jobs_of_a_data_set_or_version_are_the_tenants_own(db: Database) -> None:
    with db.unit_of_work() as session:
        acme, other = make_tenant(session, "acme"), make_tenant(session, "other")
        version, forget, retain = make_model(session, acme)
        running = make_job(session, acme, version, forget, state=JobState.RUNNING)
        retaining = make_job(session, acme, version, retain, retain=forget)
        make_job(session, acme, version, forget, state=JobState.SUCCEEDED)  # ended
        # Another tenant's job naming acme's rows by id: never acme's business.
        their_version, their_forget, _ = make_model(session, other)
        make_job(session, other, their_version, forget, retain=forget)
        crossed = make_job(session, other, version, their_forget)
        cancelling = make_job(session, acme, version, retain, state=JobState.CANCELLING)

        jobs = JobRepository(session, acme.id)
        assert {j.id for j in jobs.active_using_dataset(forget.id)} == {running.id, retaining.id}
        assert {j.id for j in jobs.active_using_version(version.id)} == {
            running.id,
            retaining.id,
            cancelling.id,
        }
        theirs = JobRepository(session, other.id)
        assert [j.id for j in theirs.active_using_version(version.id)] == [crossed.id]
        assert theirs.active_using_dataset(retain.id) == []


def test_an_audit_chain_reads_only_its_own_entries(db: Database) -> None:
    with db.unit_of_work() as session:
        acme, other = make_tenant(session, "acme"), make_tenant(session, "other")
        for n in range(3):
            audit.record(session, tenant_id=acme.id, actor="t", action=f"a.{n}",
                         resource_type="r")  # fmt: skip
            audit.record(session, tenant_id=other.id, actor="t", action="b", resource_type="r")
    with db.unit_of_work() as session:
        chain = AuditChainRepository(session, str(acme.id))
        entries = list(chain.entries())
        assert [(e.seq, e.action) for e in entries] == [(1, "a.0"), (2, "a.1"), (3, "a.2")]
        assert (chain.head().seq, chain.head().hash) == (3, entries[-1].hash)
        assert audit_chains(session) == {str(acme.id), str(other.id)}

        fresh = AuditChainRepository(session, "new-chain")
        assert fresh.head() is None
        head = fresh.lock_head(audit.GENESIS_HASH)
        assert (head.chain, head.seq, head.hash) == ("new-chain", 0, audit.GENESIS_HASH)
        assert list(fresh.entries()) == []
        assert "new-chain" in audit_chains(session)


def test_retention_work_spans_every_tenant_earliest_finished_first(db: Database) -> None:
    now = utcnow()
    with db.unit_of_work() as session:
        ids = {}
        for name, retention_state, ago in (
            ("acme", "pending", 1),
            ("other", "waiting", 3),
            ("third", "done", 5),
            ("fourth", None, 7),
            ("fifth", "pending", 2),
        ):
            tenant = make_tenant(session, name)
            version, forget, _ = make_model(session, tenant)
            job = make_job(session, tenant, version, forget, state=JobState.SUCCEEDED,
                           retention_state=retention_state,
                           finished_at=now - timedelta(minutes=ago))  # fmt: skip
            ids[name] = job.id
    with db.unit_of_work() as session:
        steps = StepRepository(session)
        assert steps.by_retention_state(["pending", "waiting"], 10) == [
            ids["other"],
            ids["fifth"],
            ids["acme"],
        ]
        assert steps.by_retention_state(["pending", "waiting"], 1) == [ids["other"]]


def test_a_transaction_lock_is_held_until_its_transaction_ends(db: Database) -> None:
    key = uuid.uuid4().int >> 65  # a positive 63-bit key no other test uses
    with db.sessions() as first, db.sessions() as second:
        assert try_transaction_lock(first, key)
        assert try_transaction_lock(first, key)  # the holder may take it again
        assert not try_transaction_lock(second, key)
        first.commit()
        assert try_transaction_lock(second, key)
        second.rollback()
