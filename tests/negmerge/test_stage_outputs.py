"""The stages' outputs (negmerge.stage_outputs): each one's file reads back as the output that
wrote it, files written before the models existed still read (and write back the same), and
the worker's database boundary (to_stored, then model_validate) loses nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from negmerge.escalation import RoundSummary, RoundVerdict
from negmerge.stage_outputs import (
    BaseModelHashes,
    BeforeAfter,
    EscalationOutcome,
    Evaluated,
    ForgetSetHashes,
    GroupBeforeAfter,
    GroupMetrics,
    LambdaEvaluated,
    Merged,
    MergeState,
    ModelFile,
    Original,
    Report,
    Searched,
    Seeds,
    StageOutput,
    VariantRecord,
    VariantStats,
    to_stored,
)
from negmerge.verdict import Target, judge

# report.json files written before the stage outputs were typed: a worker's (its variants
# folded into running merge states, so they name no task vector file; its merge step timed)
# and round 1 of a job run in process.
DATA = Path(__file__).parent / "data"
WRITTEN_BEFORE = [DATA / "report_by_a_worker.json", DATA / "report_of_round_1.json"]

METRICS_BEFORE = {"forget_acc": 100.0, "retain_acc": 93.75, "test_acc": 88.5, "mia": None}
METRICS_AFTER = {"forget_acc": 12.5, "retain_acc": 91.0, "test_acc": 86.25, "mia": None}


def variant(index: int, folded: bool) -> VariantRecord:
    state = MergeState(
        group=0,
        path=f"s3://bucket/jobs/j/states/0/w-{index + 1:03d}.safetensors",
        sha256="c" * 64,
        bytes=4096,
        variants=list(range(index + 1)),
        worker="host-12-0",
        replaces=f"s3://bucket/jobs/j/states/0/w-{index:03d}.safetensors" if index else None,
    )
    return VariantRecord(
        index=index,
        key=f"{index:012x}",
        hyperparameters={"optimizer": "adamw", "lr": 0.05, "steps": 2},
        seconds=1.5,
        final_loss=0.25 if index else None,
        device_usage={"memory_allocated_mib": 120.0, "memory_peak_mib": 300.5},
        tau_sha256="d" * 64,
        path=None if folded else f"/work/variants/{index:03d}-{index:012x}.safetensors",
        merge_state=state if folded else None,
    )


def searched() -> Searched:
    points = [
        LambdaEvaluated(lambda_=0.0, forget_acc=100.0, retain_acc=95.0, holdout_acc=None),
        LambdaEvaluated(lambda_=0.5, forget_acc=10.0, retain_acc=91.0, holdout_acc=None),
    ]
    return Searched(
        lambda_=0.5,
        evaluation=Evaluated(forget_acc=10.0, retain_acc=91.0),
        reference=Evaluated(forget_acc=100.0, retain_acc=95.0),
        rule="retain-threshold",
        retain_ratio=0.95,
        retain_threshold=90.25,
        strategy="grid",
        at_upper_end=False,
        grid_size=2,
        n_evaluated=2,
        evaluation_order=[0.0, 0.5],
        evaluations=points,
        refined=[0.45],
        round=1,
        seconds=2.5,
    )


def merged(folded: bool) -> Merged:
    return Merged(
        round=1,
        method="negmerge",
        params={"consensus": 1.0},
        n=2,
        kept_fraction=0.4,
        merged_sha256="e" * 64,
        merged_layout="sparse",
        merged_bytes=1000,
        merged_dense_bytes=4000,
        seconds=0.75 if folded else None,  # the worker's merge step times itself
        variants=[variant(0, folded), variant(1, folded)],
    )


def report() -> Report:
    verdict = judge(
        Target(forget_acc_max=20.0, retain_ratio=0.95), "class", METRICS_BEFORE, METRICS_AFTER, 0.5
    )
    summary = RoundSummary(
        round=0,
        variants_merged=[0, 1],
        finetune_seconds=3.0,
        kept_fraction=0.4,
        lambda_=0.5,
        verdict=RoundVerdict(met=verdict.met, reason=verdict.reason),
        model_sha256="f" * 64,
    )
    group = GroupMetrics(count=2, acc=50.0, true_label_confidence=40.5)
    return Report(
        code_version="0.1.0",
        job={"seed": 0, "forget": {"classes": ["three"]}},
        seeds=Seeds(job=0, variants=[11, 12]),
        base_model=BaseModelHashes(sha256="a" * 64, weights_sha256=None),
        forget_set=ForgetSetHashes(manifest_sha256="b" * 64, count=12),
        split_sizes={"forget": 12, "retain": 80},
        variants=merged(True).variants,
        merge=merged(True).summary(),
        search=searched(),
        lambda_=0.5,
        metrics=BeforeAfter(before=METRICS_BEFORE, after=METRICS_AFTER),
        groups={"request-1": GroupBeforeAfter(before=group, after=group)},
        verdict=verdict,
        round=0,
        rounds=[summary],
        escalation=EscalationOutcome(next_round=None, stopped_because="target met"),
        model=ModelFile(path="/work/model.safetensors", sha256="f" * 64),
        finetuning="standard",
        timings={"prepare": 1.0, "finetune": 3.0, "merge": None},
    )


OUTPUTS: list[StageOutput] = [
    Original(
        metrics=METRICS_BEFORE,
        base_sha256="a" * 64,
        weights_sha256=None,
        forget_manifest_sha256="b" * 64,
        forget_count=12,
        split_sizes={"forget": 12, "retain": 80},
        seconds=4.25,
    ),
    VariantStats(seconds=1.5, final_loss=None, device_usage=None),
    variant(0, folded=False),
    variant(1, folded=True),
    merged(folded=False),
    merged(folded=True),
    searched(),
    report(),
]


@pytest.mark.parametrize("output", OUTPUTS, ids=lambda o: type(o).__name__)
def test_an_output_reads_back_from_its_file_as_it_was(output, tmp_path):
    path = tmp_path / "output.json"
    output.write(path)
    assert type(output).read(path) == output
    assert json.loads(path.read_text()) == to_stored(output)


@pytest.mark.parametrize("output", OUTPUTS, ids=lambda o: type(o).__name__)
def test_the_worker_boundary_loses_nothing(output):
    stored = to_stored(output)
    json.dumps(stored)  # what the step table's JSON column takes
    assert type(output).model_validate(stored) == output
    assert to_stored(type(output).model_validate(stored)) == stored


def test_the_files_keep_their_keys():
    folded, kept = to_stored(variant(1, folded=True)), to_stored(variant(0, folded=False))
    assert "path" not in folded and folded["merge_state"]["worker"] == "host-12-0"
    assert "merge_state" not in kept and kept["path"].endswith(".safetensors")
    assert "seconds" not in to_stored(merged(folded=False))  # in process: not timed itself
    search = to_stored(searched())
    assert search["lambda"] == 0.5 and "lambda_" not in search
    assert search["evaluation"] == {"forget_acc": 10.0, "retain_acc": 91.0, "holdout_acc": None}
    assert search["evaluations"][1] == {
        "lambda": 0.5,
        "forget_acc": 10.0,
        "retain_acc": 91.0,
        "holdout_acc": None,
    }
    written = to_stored(report())
    assert all(set(written) == set(json.loads(path.read_text())) for path in WRITTEN_BEFORE)
    assert "variants" not in written["merge"] and written["rounds"][0]["lambda"] == 0.5


@pytest.mark.parametrize("path", WRITTEN_BEFORE, ids=lambda p: p.stem)
def test_a_report_written_before_reads_and_writes_back_the_same(path):
    written = json.loads(path.read_text())
    read = Report.read(path)
    assert read.round == written["round"] and read.lambda_ == written["lambda"]
    assert [v.path for v in read.variants] == [v.get("path") for v in written["variants"]]
    assert read.merge.seconds == written["merge"].get("seconds")
    assert read.rounds[-1].lambda_ == written["rounds"][-1]["lambda"]
    assert read.search.evaluations[1].lambda_ == written["search"]["evaluations"][1]["lambda"]
    # The same file again, but for the search's `refined`, which these predate.
    again = to_stored(read)
    assert again["search"].pop("refined") == []
    assert again == written


def test_a_report_from_before_later_fields_reads_with_their_defaults():
    written = json.loads(WRITTEN_BEFORE[0].read_text())
    for key in ("groups", "round", "rounds", "finetuning"):
        del written[key]
    del written["base_model"]["weights_sha256"]
    read = Report.model_validate(written)
    assert (read.groups, read.round, read.rounds, read.finetuning) == ({}, 0, [], "standard")
    assert read.base_model.weights_sha256 is None


def test_the_outputs_load_without_torch():
    code = "import sys, negmerge.stage_outputs; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
