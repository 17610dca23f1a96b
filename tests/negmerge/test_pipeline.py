"""The whole unlearning job on the offline fixtures, for each model family."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from negmerge.cli import main
from negmerge.context import JobContext
from negmerge.errors import CheckpointError, DataError, DivergedError, NegMergeError
from negmerge.fixtures import ensure_tiny_classifier, ensure_tiny_clip
from negmerge.fixtures.jobs import forget_class_job, forget_domain_job
from negmerge.io import file_sha256, load_state_dict
from negmerge.job_spec import JobSpec
from negmerge.pipeline import finetune_variant, run_unlearning
from negmerge.stage_outputs import EscalationOutcome, Report, to_stored


@pytest.fixture(scope="session")
def clip():
    return ensure_tiny_clip()


@pytest.fixture(scope="session")
def classifier():
    return ensure_tiny_classifier()


def clip_job(clip, **overrides) -> dict:
    return {**forget_domain_job(clip), "max_eval_samples": 200, **overrides}


def classifier_job(classifier, **overrides) -> dict:
    return {**forget_class_job(classifier, "three"), "max_eval_samples": 200, **overrides}


def check_unlearned(report: Report) -> None:
    before, after = report.metrics.before, report.metrics.after
    assert after["forget_acc"] < before["forget_acc"]
    search = report.search
    chosen = next(e for e in search.evaluations if e.lambda_ == report.lambda_)
    assert report.lambda_ > 0
    assert chosen.retain_acc >= search.retain_ratio * search.reference.retain_acc


def test_clip_forgets_a_domain_and_keeps_the_other(clip, tmp_path):
    report = run_unlearning(JobSpec.model_validate(clip_job(clip)), tmp_path)
    check_unlearned(report)
    assert 0 < report.merge.kept_fraction < 1
    assert report.merge.n == 6
    # The merged vector is stored sparse, and the search and the model were made from it.
    merge = report.merge
    assert merge.merged_layout == "sparse"
    assert merge.merged_bytes == (tmp_path / "merged.safetensors").stat().st_size
    assert merge.merged_bytes < merge.merged_dense_bytes
    # The task vector covers the image tower only: the text tower is carried over unchanged.
    base, model = (
        load_state_dict(tmp_path / "base.safetensors"),
        load_state_dict(tmp_path / "model.safetensors"),
    )
    assert all(torch.equal(base[k], model[k]) for k in base if not k.startswith("visual."))
    assert any(not torch.equal(base[k], model[k]) for k in base if k.startswith("visual."))
    assert report.model.sha256 == file_sha256(tmp_path / "model.safetensors")


def test_classifier_forgets_a_class(classifier, tmp_path):
    report = run_unlearning(JobSpec.model_validate(classifier_job(classifier)), tmp_path)
    check_unlearned(report)
    assert report.forget_set.count == sum(
        1
        for line in (classifier.dataset_root / "manifest.jsonl").read_text().splitlines()
        if json.loads(line)["label"] == "three"
    )
    stored = to_stored(report)
    for key in ("config", "job", "seeds", "base_model", "variants", "merge", "search", "timings"):
        assert key in stored or key == "config"
    assert len(report.variants) == 4 and all(v.tau_sha256 for v in report.variants)


def test_fast_search_picks_the_grid_lambda(classifier, tmp_path):
    fast = run_unlearning(JobSpec.model_validate(classifier_job(classifier)), tmp_path / "fast")
    job = classifier_job(classifier, search={"strategy": "grid"})
    grid = run_unlearning(JobSpec.model_validate(job), tmp_path / "grid")
    assert fast.lambda_ == grid.lambda_
    # Every grid point, then refinement's (search.refine) between two of them.
    searched, grid_size = grid.search, grid.search.grid_size
    assert searched.n_evaluated == grid_size + len(searched.refined) and grid_size >= 41
    assert fast.search.n_evaluated - len(fast.search.refined) <= grid_size / 3


def test_finetuning_is_deterministic_for_a_seed(classifier, tmp_path):
    spec = JobSpec.model_validate(classifier_job(classifier))
    taus = []
    for run in ("a", "b"):
        ctx = JobContext.load(spec, tmp_path / run)
        ctx.workdir.claim(spec)
        record = finetune_variant(ctx, 1)
        taus.append(load_state_dict(record.path))
    assert taus[0].keys() == taus[1].keys()
    assert all(torch.equal(taus[0][k], taus[1][k]) for k in taus[0])
    other = JobSpec.model_validate(classifier_job(classifier, seed=5))
    ctx = JobContext.load(other, tmp_path / "c")
    ctx.workdir.claim(other)
    changed = load_state_dict(finetune_variant(ctx, 1).path)
    assert any(not torch.equal(changed[k], taus[0][k]) for k in changed)


def test_variants_with_the_same_hyperparameters_train_apart_and_rerun_the_same(
    classifier, tmp_path
):
    # Two variants that differ only in their derived seeds: the data order differs, so the
    # task vectors do too; a rerun of the same job gives the same bytes.
    job = classifier_job(classifier, variants={"base": {"steps": 3}, "grid": {"lr": [0.05, 0.05]}})
    spec = JobSpec.model_validate(job)
    seeds = [v.seed for v in spec.variant_list()]
    assert seeds[0] != seeds[1]
    runs = []
    for run in ("a", "b"):
        ctx = JobContext.load(spec, tmp_path / run)
        ctx.workdir.claim(spec)
        runs.append([load_state_dict(finetune_variant(ctx, i).path) for i in (0, 1)])
    first, second = runs[0]
    assert any(not torch.equal(first[k], second[k]) for k in first)
    for again, before in zip(runs[1], runs[0], strict=True):
        assert all(torch.equal(again[k], before[k]) for k in before)


def test_a_diverged_variant_is_refused_by_name_and_not_merged(classifier, tmp_path):
    # An absurd learning rate without clipping blows the weights up to Inf/NaN.
    variants = {"base": {"steps": 3, "lr": 1e30, "grad_clip": None}, "grid": {"lr": [0.05, 1e30]}}
    spec = JobSpec.model_validate(classifier_job(classifier, variants=variants))
    with pytest.raises(DivergedError, match=r"variant 1 \(adamw lr=1e\+30 .*holds \d+ NaN and"):
        run_unlearning(spec, tmp_path)
    written = sorted(p.name for p in (tmp_path / "variants").glob("*.safetensors"))
    assert len(written) == 1 and written[0].startswith("000-")  # the finite one only
    assert not (tmp_path / "merged.safetensors").exists()


def test_the_forget_tasks_own_head_and_training_preprocessing(clip, classifier, tmp_path):
    taus = {}
    for name, base in [
        ("all", {"steps": 2}),
        ("forget", {"steps": 2, "head": "forget"}),
        ("train", {"steps": 2, "preprocess": "train", "augment": "rand-m9-n2-mstd0.5"}),
        ("train-again", {"steps": 2, "preprocess": "train", "augment": "rand-m9-n2-mstd0.5"}),
    ]:
        spec = JobSpec.model_validate(clip_job(clip, variants={"base": base}))
        ctx = JobContext.load(spec, tmp_path / name)
        ctx.workdir.claim(spec)
        taus[name] = load_state_dict(finetune_variant(ctx, 0).path)
    differs = lambda a, b: any(not torch.equal(taus[a][k], taus[b][k]) for k in taus[a])  # noqa: E731
    assert differs("all", "forget") and differs("all", "train")
    assert not differs("train", "train-again")  # seeded, crops and flips included
    spec = JobSpec.model_validate(classifier_job(classifier, variants={"base": {"head": "forget"}}))
    with pytest.raises(NegMergeError, match="variants.head: 'forget' needs a forget set of at"):
        run_unlearning(spec, tmp_path / "one-class")


@pytest.mark.parametrize(("seed", "label"), [(1, "seven"), (2, "seven")])
def test_the_class_recipe_forgets_on_classifiers_trained_from_other_seeds(seed, label, tmp_path):
    # The recipe is not tuned to one training of the fixture: on seed 2's, frozen batch norm
    # is what makes it forget "seven" (with batch statistics retain fell first: lambda 0).
    other = ensure_tiny_classifier(seed=seed)
    job = {**forget_class_job(other, label), "max_eval_samples": 200}
    check_unlearned(run_unlearning(JobSpec.model_validate(job), tmp_path))


def test_a_killed_run_resumes_without_retraining_and_ends_the_same(classifier, tmp_path):
    spec = JobSpec.model_validate(classifier_job(classifier))
    uninterrupted = run_unlearning(spec, tmp_path / "once")

    ctx = JobContext.load(spec, tmp_path / "twice")
    ctx.workdir.claim(spec)
    first = finetune_variant(ctx, 0)  # ... and the process dies here, between variants
    mtime = Path(first.path).stat().st_mtime_ns
    resumed = run_unlearning(spec, tmp_path / "twice")

    assert Path(first.path).stat().st_mtime_ns == mtime
    assert resumed.model.sha256 == uninterrupted.model.sha256
    assert resumed.lambda_ == uninterrupted.lambda_
    # Run again on the finished work directory, every stage reads its output back.
    assert run_unlearning(spec, tmp_path / "twice") == resumed


def test_a_workdir_belongs_to_one_job(classifier, tmp_path):
    run_spec = JobSpec.model_validate(classifier_job(classifier, variants={"base": {"steps": 1}}))
    run_unlearning(run_spec, tmp_path)
    other = JobSpec.model_validate(
        classifier_job(classifier, seed=3, variants={"base": {"steps": 1}})
    )
    with pytest.raises(NegMergeError, match="holds the outputs of another job") as refused:
        run_unlearning(other, tmp_path)
    message = str(refused.value)
    assert (
        "differs in: seed" in message and f"give another --workdir, or delete {tmp_path}" in message
    )
    # The command it gives to resume names the job the folder holds.
    assert f"negmerge unlearn {tmp_path / 'job.json'} --workdir {tmp_path}" in message
    assert JobSpec.from_file(tmp_path / "job.json") == run_spec


def test_a_fixed_job_takes_over_the_workdir_of_an_attempt_that_made_nothing(classifier, tmp_path):
    typo = classifier_job(classifier, variants={"base": {"steps": 1}})
    typo["forget"]["classes"] = ["thre"]
    with pytest.raises(DataError, match="did you mean 'three'"):
        run_unlearning(JobSpec.model_validate(typo), tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["job.json"]  # the attempt made nothing

    fixed = JobSpec.model_validate(classifier_job(classifier, variants={"base": {"steps": 1}}))
    report = run_unlearning(fixed, tmp_path)
    assert report.job == json.loads(fixed.model_dump_json())
    assert JobSpec.model_validate_json((tmp_path / "job.json").read_text()) == fixed


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        (
            lambda j: j["forget"].update(classes=["eleven"]),
            DataError,
            "classes: 'eleven' \\(did you mean 'seven'\\?\\) is not a label",
        ),
        (lambda j: j["forget"].update(classes=None, ids=["nope-1"]), DataError, "ids: 1 not in"),
        (
            lambda j: j["model"]["classes"].__setitem__(9, "ten"),
            DataError,
            "label 'nine', which is not one of the model's 10 classes",
        ),
    ],
)
def test_bad_requests_fail_with_a_clear_error(classifier, tmp_path, change, error, message):
    job = classifier_job(classifier)
    change(job)
    with pytest.raises(error, match=message):
        run_unlearning(JobSpec.model_validate(job), tmp_path)
    assert not (tmp_path / "variants").exists()


def test_an_empty_forget_set_is_refused_by_the_job_schema(classifier):
    job = classifier_job(classifier)
    job["forget"].update(classes=None, ids=[])
    with pytest.raises(ValueError, match="forget.ids"):
        JobSpec.model_validate(job)


def test_an_unreadable_image_is_named(classifier, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(classifier.dataset_root, data)
    row = next(
        json.loads(line)
        for line in (data / "manifest.jsonl").read_text().splitlines()
        if json.loads(line)["label"] == "three" and json.loads(line)["split"] == "train"
    )
    (data / row["path"]).write_bytes(b"this is not a png")
    job = classifier_job(classifier)
    job["forget"]["dataset"] = str(data)
    with pytest.raises(DataError, match=f"sample '{row['id']}': .*not a readable image"):
        run_unlearning(JobSpec.model_validate(job), tmp_path / "work")


def test_a_pickled_checkpoint_is_refused(classifier, tmp_path):
    import timm

    torch.save(timm.create_model("test_resnet", num_classes=10), tmp_path / "model.pt")
    job = classifier_job(classifier)
    job["model"]["weights"] = str(tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match="refused to load"):
        run_unlearning(JobSpec.model_validate(job), tmp_path / "work")


def test_cli_runs_a_job_file_with_relative_paths(classifier, tmp_path):
    # The preset as the quick start runs it (two steps no longer move this model: its
    # recipe has no weight decay to shrink weights with), a loose retain bound, and a target
    # any lambda > 0 meets: the exit code follows the verdict, not the recipe.
    job = classifier_job(classifier, variants={"preset": "tiny-classifier"})
    shutil.copy(classifier.weights_path, tmp_path / "weights.safetensors")
    job["model"]["weights"] = "weights.safetensors"  # relative to the job file
    job["search"] = {"retain_ratio": 0.01}
    job["target"] = {"forget_acc_max": 100.0}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    result = CliRunner().invoke(
        main, ["unlearn", str(tmp_path / "job.yaml"), "--workdir", str(tmp_path / "w")]
    )
    assert result.exit_code == 0, result.output
    assert "forget accuracy (Acc D_f)" in result.output and "lambda" in result.output
    report = json.loads((tmp_path / "w" / "report.json").read_text())
    assert f"sha256 {report['model']['sha256']}" in result.output
    assert report["verdict"]["met"] and "verdict       MET" in result.output

    bad = CliRunner().invoke(
        main, ["unlearn", str(tmp_path / "missing.yaml"), "--workdir", str(tmp_path / "x")]
    )
    assert bad.exit_code != 0 and "missing.yaml: cannot read the job" in bad.output


def test_cli_exits_5_when_the_target_is_not_met(classifier, tmp_path):
    # Nothing but a perfect forget would meet this; two steps of fine-tuning do not.
    job = classifier_job(classifier, variants={"preset": "tiny-classifier", "base": {"steps": 2}})
    job["target"] = {"forget_acc_max": 0.0, "mia_min": 100.0}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    result = CliRunner().invoke(
        main, ["unlearn", str(tmp_path / "job.yaml"), "--workdir", str(tmp_path / "w"), "--json"]
    )
    assert result.exit_code == 5, result.output
    report = json.loads(result.output)
    assert not report["verdict"]["met"] and report["verdict"]["reason"].startswith("not met")
    assert report["verdict"]["target"] == {
        "forget_acc_max": 0.0,
        "forget_drop_min": None,
        "holdout_gap_max": None,
        "mia_min": 100.0,
        "retain_ratio": 0.95,
    }


def test_lambda_zero_writes_no_model_and_is_not_met(classifier, tmp_path):
    job = classifier_job(classifier, variants={"preset": "tiny-classifier", "base": {"steps": 1}})
    job["search"] = {"grid": [0.0]}
    job["target"] = {"forget_acc_max": 100.0, "retain_ratio": 0.01}
    report = run_unlearning(JobSpec.model_validate(job), tmp_path)
    assert report.lambda_ == 0 and report.model is None
    assert not (tmp_path / "model.safetensors").exists()
    verdict = report.verdict
    assert not verdict.met and "nothing was forgotten" in verdict.reason
    assert [c.bound for c in verdict.checks if not c.met] == ["lambda"]


def test_holdout_match_measures_the_held_out_split_once(classifier, tmp_path):
    """Held-out data is the retain val split: one evaluation serves both numbers."""
    job = classifier_job(classifier, search={"rule": "holdout-match", "strategy": "grid"})
    report = run_unlearning(JobSpec.model_validate(job), tmp_path)
    evaluations = report.search.evaluations
    assert len(evaluations) == report.search.grid_size >= 41
    assert all(e.holdout_acc == e.retain_acc for e in evaluations)


@pytest.mark.parametrize("strategy", ["more", "longer"])
def test_a_missed_target_runs_the_rounds_allowed(classifier, tmp_path, strategy):
    # No model forgets perfectly and keeps MIA at 100: every round misses, so all run.
    job = classifier_job(classifier, variants={"preset": "tiny-classifier", "base": {"steps": 2}})
    job["target"] = {"forget_acc_max": 0.0, "mia_min": 100.0}
    job["escalation"] = {"rounds": 1, "strategy": strategy}
    report = run_unlearning(JobSpec.model_validate(job), tmp_path)
    assert report.round == 1 and not report.verdict.met
    assert [r.round for r in report.rounds] == [0, 1]
    assert report.escalation.next_round is None
    assert "allows 1 further round" in report.escalation.stopped_because
    merged = report.rounds[1].variants_merged
    assert merged == ([0, 1, 2, 3, 4, 5, 6, 7] if strategy == "more" else [4, 5, 6, 7])
    steps = [v.hyperparameters for v in report.variants]
    assert {s["steps"] for s in steps} == ({2} if strategy == "more" else {4})
    assert len(set(report.seeds.variants)) == 8
    # Round 0's own outputs stay where they were; round 1's are under rounds/1.
    round_0 = Report.read(tmp_path / "report.json")
    assert round_0.escalation.next_round == 1 and round_0.rounds == report.rounds[:1]
    assert (tmp_path / "rounds" / "1" / "merged.safetensors").exists()


def test_a_met_target_stops_at_its_round(classifier, tmp_path):
    # Any lambda > 0 that lowers forget accuracy meets this; lambda 1 on 20 steps' tau does.
    job = classifier_job(classifier, variants={"preset": "tiny-classifier", "base": {"steps": 20}})
    job["target"] = {"forget_acc_max": 100.0, "retain_ratio": 0.01}
    job["search"] = {"grid": [0.0, 1.0], "max_extensions": 0, "retain_ratio": 0.01}
    job["escalation"] = {"rounds": 2}
    report = run_unlearning(JobSpec.model_validate(job), tmp_path)
    assert report.verdict.met and report.round == 0
    assert report.escalation == EscalationOutcome(next_round=None, stopped_because="target met")
    assert not (tmp_path / "rounds").exists()


def test_confidence_match_reads_the_forget_sets_confidence(classifier, tmp_path):
    lines = (classifier.dataset_root / "manifest.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    ids = [row["id"] for row in rows if row.get("split", "train") == "train"][:40]
    job = classifier_job(classifier, variants={"preset": "tiny-classifier", "base": {"steps": 3}})
    job["forget"] = {"dataset": job["forget"]["dataset"], "ids": ids}
    job["search"] = {"rule": "confidence-match", "strategy": "grid", "grid": [0.0, 0.5, 1.0],
                     "max_extensions": 0}  # fmt: skip
    report = run_unlearning(JobSpec.model_validate(job), tmp_path)
    evaluations = report.search.evaluations
    assert len(evaluations) == 3
    assert all(0 < e.forget_conf <= 100 and 0 < e.holdout_conf <= 100 for e in evaluations)
    reference = evaluations[0].retain_acc
    feasible = [e for e in evaluations if e.retain_acc >= 0.95 * reference]
    best = min(feasible, key=lambda e: (abs(e.forget_conf - e.holdout_conf), e.lambda_))
    assert report.lambda_ == best.lambda_


def test_groups_are_measured_on_their_own_before_and_after(classifier, tmp_path):
    rows = [json.loads(line) for line in
            (classifier.dataset_root / "manifest.jsonl").read_text().splitlines()]  # fmt: skip
    threes = [r["id"] for r in rows if r["label"] == "three"]
    job = classifier_job(classifier, variants={"preset": "tiny-classifier", "base": {"steps": 20}})
    job["forget"] = {"dataset": job["forget"]["dataset"], "ids": threes}
    job["search"] = {"grid": [0.0, 1.0], "max_extensions": 0, "retain_ratio": 0.01}
    job["groups"] = {"first": {"ids": threes[:5]}, "rest": {"ids": threes[5:]}}
    report = run_unlearning(JobSpec.model_validate(job), tmp_path)
    assert report.lambda_ == 1.0
    groups = report.groups
    assert set(groups) == {"first", "rest"}
    assert groups["first"].before.count == groups["first"].after.count == 5
    assert groups["rest"].after.count == min(len(threes) - 5, 200)
    for group in groups.values():
        before, after = group.before, group.after
        assert 0 <= after.acc <= 100 and 0 < after.true_label_confidence <= 100
        # Unlearning the samples lowers the model's confidence in their labels.
        assert after.true_label_confidence < before.true_label_confidence


def test_a_group_outside_the_forget_set_is_refused(classifier, tmp_path):
    job = classifier_job(classifier, groups={"other": {"classes": ["four"]}})
    with pytest.raises(DataError, match="groups.other: samples outside the forget set"):
        run_unlearning(JobSpec.model_validate(job), tmp_path)
