"""Targets and verdicts: the pure logic, on metrics as the pipeline reports them."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from negmerge.verdict import DEFAULT_TARGETS, Target, judge, resolve_target, target_kind

BEFORE = {"forget_acc": 100.0, "forget_test_acc": 90.0, "retain_acc": 98.0, "test_acc": 90.0,
          "mia": 0.0}  # fmt: skip


def after(**changes: float | None) -> dict[str, float | None]:
    return {**BEFORE, **changes}


def resolved(**bounds: float) -> Target:
    return resolve_target(Target(**bounds), "class", 0.95)[0]


def test_the_kind_follows_the_forget_selection_and_each_has_a_default():
    assert target_kind(["three"], None) == "class"
    assert target_kind(None, ["img-1"]) == "samples"
    assert target_kind(None, None) == "domain"
    target, default = resolve_target(None, "samples", 0.9)
    assert default and target.retain_ratio == 0.9
    assert target.holdout_gap_max == DEFAULT_TARGETS["samples"].holdout_gap_max
    stated, default = resolve_target(Target(forget_acc_max=5, retain_ratio=0.5), "class", 0.9)
    assert not default and stated.retain_ratio == 0.5


def test_a_target_must_bound_something_forgotten():
    with pytest.raises(ValidationError, match="at least one of forget_acc_max"):
        Target(retain_ratio=0.9)
    with pytest.raises(ValidationError):
        Target(forget_acc_max=101)


def test_class_target_met_and_not_met_on_every_forget_split():
    target = resolved(forget_acc_max=10)
    met = judge(target, "class", BEFORE, after(forget_acc=5.0, forget_test_acc=8.0), 0.5)
    assert met.met and met.reason.startswith("target met")
    # The test split of the forget class still recognised: not met, and the reason says which.
    missed = judge(target, "class", BEFORE, after(forget_acc=5.0, forget_test_acc=40.0), 0.5)
    assert not missed.met
    failed = [c for c in missed.checks if not c.met]
    assert [(c.bound, c.metric, c.value) for c in failed] == [
        ("forget_acc_max", "forget_test_acc", 40.0)
    ]
    assert "forget test accuracy 40.00 (must be <= 10)" in missed.reason


def test_the_retain_constraint_applies_to_retain_and_test():
    target = resolved(forget_acc_max=10)
    verdict = judge(target, "class", BEFORE, after(forget_acc=0.0, forget_test_acc=0.0,
                                                  test_acc=80.0), 1.0)  # fmt: skip
    assert not verdict.met
    (failed,) = [c for c in verdict.checks if not c.met]
    assert failed.metric == "test_acc" and failed.limit == pytest.approx(0.95 * 90.0)


def test_domain_relative_drop():
    target = resolved(forget_drop_min=0.5)
    assert judge(target, "domain", BEFORE, after(forget_acc=50.0, forget_test_acc=45.0), 1).met
    verdict = judge(target, "domain", BEFORE, after(forget_acc=50.0, forget_test_acc=46.0), 1)
    assert not verdict.met  # 46 > half of 90


def test_samples_holdout_gap_and_mia():
    target = resolved(holdout_gap_max=5, mia_min=10)
    near = after(forget_acc=93.0, forget_test_acc=None, mia=20.0)
    assert judge(target, "samples", BEFORE, near, 0.4).met
    memorised = judge(target, "samples", BEFORE, after(forget_acc=100.0, mia=20.0), 0.4)
    assert not memorised.met and "|forget - test accuracy| 10.00" in memorised.reason
    unmeasured = judge(target, "samples", BEFORE, after(forget_acc=93.0, mia=None), 0.4)
    assert not unmeasured.met and "MIA-efficacy not measured" in unmeasured.reason


def test_lambda_zero_is_never_met_however_loose_the_bounds():
    verdict = judge(resolved(forget_acc_max=100, retain_ratio=0.01), "class", BEFORE, BEFORE, 0.0)
    assert not verdict.met
    assert "chose 0" in verdict.reason and "nothing was forgotten" in verdict.reason
    assert verdict.to_dict()["lambda"] == 0.0


def test_a_stated_target_that_needs_a_test_split_is_refused_on_data_without_one(tmp_path):
    from negmerge.data import Manifest
    from negmerge.errors import DataError
    from negmerge.fixtures import ensure_tiny_classifier
    from negmerge.fixtures.jobs import forget_class_job
    from negmerge.job_spec import JobSpec, make_splits

    classifier = ensure_tiny_classifier()
    rows = (classifier.dataset_root / "manifest.jsonl").read_text().splitlines()
    (tmp_path / "manifest.jsonl").write_text(
        "".join(line + "\n" for line in rows if '"test"' not in line)
    )
    manifest = Manifest.load(tmp_path / "manifest.jsonl", classifier.dataset_root)
    job = forget_class_job(classifier)
    job["forget"] = {"dataset": str(tmp_path / "manifest.jsonl"), "classes": ["three"]}

    default = JobSpec.model_validate(job)  # the default class target needs no test split
    assert make_splits(default, manifest, manifest)["test"] == []
    stated = JobSpec.model_validate({**job, "target": {"mia_min": 10.0}})
    with pytest.raises(DataError, match="target: holdout_gap_max and mia_min need"):
        make_splits(stated, manifest, manifest)
