"""Every kind of the step table (app.step_table) has a runner in the worker, and its files are
work-directory files (worker/tasks.py RUNNERS, worker/staging.py files_of)."""

from __future__ import annotations

import pytest

from app.step_table import STEPS, VARIANT, VARIANTS, Naming, step_name
from negmerge.job_spec import JobSpec
from negmerge.workdir import Workdir
from worker.staging import files_of
from worker.tasks import RUNNERS, runner_per_kind

SPEC = JobSpec.model_validate(
    {
        "model": {
            "family": "classifier",
            "architecture": "tiny-cnn",
            "weights": "/models/base.safetensors",
            "classes": ["a", "b", "c"],
            "image_size": 32,
        },
        "forget": {"dataset": "/data/digits", "classes": ["a"]},
        "variants": {"preset": "tiny-classifier"},
        "escalation": {"rounds": 2, "strategy": "more"},
    }
)


def test_every_kind_of_step_has_a_runner():
    assert RUNNERS.keys() == STEPS.keys()
    assert all(callable(runner) for runner in RUNNERS.values())


def test_a_runner_missing_or_for_no_kind_stops_the_worker():
    without_merge = {kind: run for kind, run in RUNNERS.items() if kind != "merge"}
    with pytest.raises(RuntimeError, match=r"none for \['merge'\]"):
        runner_per_kind(without_merge)
    with pytest.raises(RuntimeError, match=r"not in the step table: \['distill'\]"):
        runner_per_kind({**RUNNERS, "distill": RUNNERS["merge"]})


@pytest.mark.parametrize("kind", sorted(STEPS))
def test_each_kind_reads_and_writes_work_directory_files(kind):
    declared = STEPS[kind]
    for name in declared.reads + declared.writes:
        assert name in (VARIANT, VARIANTS) or isinstance(getattr(Workdir, name), property)
    files = files_of(step_name(kind, 0 if declared.naming is Naming.ONCE else 1), SPEC)
    assert files.outputs and not set(files.inputs) & set(files.outputs)


def test_a_later_round_s_files_are_its_own_and_a_folded_merge_reads_no_task_vectors():
    first = len(SPEC.round_variants(0))
    merge = files_of("merge@1", SPEC)
    merged = [i for i, _ in SPEC.merged_variants(1)]
    assert len(merged) == 2 * first  # "more": every variant so far
    assert len(merge.inputs) == 2 * len(merged)  # each task vector and its record
    assert merge.outputs == ["rounds/1/merged.safetensors"]
    assert files_of("merge@1", SPEC, folded=True).inputs == []
    finalize = files_of("finalize@2", SPEC)
    assert finalize.inputs == ["base.safetensors", "rounds/2/merged.safetensors"]
    assert finalize.outputs == ["rounds/2/model.safetensors", "rounds/2/report.json"]
    variant = files_of(f"finetune:{first}", SPEC)  # round 1's first: at the job's top level
    assert variant.inputs == [] and variant.outputs[-1].startswith(f"variants/{first:03d}-")
