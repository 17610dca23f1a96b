"""A worker never imports what a stored job names (tenant input is data): a job spec written
before architectures became names fails its step cleanly, and nothing it names runs."""

from __future__ import annotations

import uuid

import pytest

from app.services import steps
from negmerge.errors import NegMergeError
from negmerge.fixtures.jobs import forget_class_job
from worker.tasks import Runtime, load_context


def test_a_stored_spec_with_an_import_path_fails_without_running(classifier, settings, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    spec = forget_class_job(classifier)
    spec["model"] |= {
        "architecture": "logging:basicConfig",
        "init_args": {"force": True, "filename": str(victim), "filemode": "w"},
    }
    claim = steps.Claim(
        job_id=uuid.uuid4(),
        tenant_id=uuid.uuid4(),
        step=steps.PREPARE,
        owner="test",
        attempt=1,
        spec=spec,
        request={},
        variants_total=1,
    )
    with pytest.raises(NegMergeError, match=r"architecture: .* looks like an import path"):
        load_context(Runtime(settings, db=None, queue=None, pid=0), claim)  # type: ignore[arg-type]
    assert victim.read_text() == "precious"
