"""The whole unlearning job as a library call.

    evaluate the original -> fine-tune n variants -> merge -> search lambda -> evaluate
        -> judge against the target (negmerge.verdict) -> store (not at lambda 0)

Each stage writes its output into the work directory (negmerge.workdir) atomically and a
re-run skips what is there, so a crash or a kill costs only the stage that was running
(finished variants are not trained again). The stages are separate functions so that workers
can run them as separate tasks; `run_unlearning` runs them all in one process.

The job's schema and its data splits are negmerge.job_spec's; what every stage loads once
(the model, the data, the evaluations) is negmerge.context's; what each stage returns (and
writes) is negmerge.stage_outputs'.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TypeVar

from negmerge.context import JobContext, forget_set
from negmerge.errors import DivergedError, NegMergeError
from negmerge.escalation import RoundSummary, RoundVerdict
from negmerge.io import file_sha256, open_checkpoint, save_file
from negmerge.job_spec import JobSpec
from negmerge.linearize import apply_tangent_file, linearized_metadata
from negmerge.merge.running import combine_states, fold_task_vector, write_merged
from negmerge.merge.streaming import merge_files
from negmerge.search import Evaluation, SearchResult, search_lambda
from negmerge.sparse import is_sparse
from negmerge.stage_outputs import (
    BaseModelHashes,
    BeforeAfter,
    EscalationOutcome,
    ForgetSetHashes,
    GroupBeforeAfter,
    Merged,
    MergeState,
    ModelFile,
    Original,
    Report,
    Searched,
    Seeds,
    VariantRecord,
    VariantStats,
)
from negmerge.task_vector import load_task_vector, subtract_task_vector_file
from negmerge.verdict import judge
from negmerge.workdir import Workdir

Returned = TypeVar("Returned")


class Progress:
    """Callbacks for a job's progress; the defaults do nothing."""

    def stage(self, name: str) -> None: ...

    def variant_step(self, index: int, n: int, step: int, total: int, loss: float) -> None: ...

    def variant_done(self, index: int, n: int) -> None: ...

    def lambda_evaluated(self, lam: float, evaluation: Evaluation) -> None: ...


# ---- stages ---------------------------------------------------------------------------------


def prepare(ctx: JobContext) -> Original:
    """Store the base model and measure the original: the 'before' of the report."""
    wd = ctx.workdir
    if wd.original.exists():
        return Original.read(wd.original)
    began = time.perf_counter()
    if not wd.base.exists():
        linear = ctx.model.finetuning == "linear"
        metadata = linearized_metadata(ctx.model.linearized_part) if linear else None
        save_file(ctx.model.full_state(), wd.base, metadata)
    original = Original(
        metrics=ctx.metrics(),
        base_sha256=file_sha256(wd.base),
        weights_sha256=file_sha256(ctx.spec.model.weights) if ctx.spec.model.weights else None,
        forget_manifest_sha256=ctx.forget_manifest.sha256(forget_set(ctx)),
        forget_count=len(forget_set(ctx)),
        split_sizes={name: len(samples) for name, samples in ctx.splits.items()},
        seconds=time.perf_counter() - began,
    )
    original.write(wd.original)
    return original


def finetune_variant(
    ctx: JobContext, index: int, on_step: Callable[[int, int, float, float], None] | None = None
) -> VariantRecord:
    """Fine-tune variant `index` and write its task vector; a finished variant is not redone."""
    from negmerge.finetune import device_usage, finetune_task_vector

    variant = ctx.spec.variant_at(index)
    path = ctx.workdir.variant(index, variant)
    if path.exists():
        return _variant_record(path)
    began = time.perf_counter()
    losses: list[float] = []

    def step(done: int, total: int, loss: float, images_per_second: float) -> None:
        losses.append(loss)
        if on_step is not None:
            on_step(done, total, loss, images_per_second)

    try:
        tau = finetune_task_vector(
            ctx.model,
            ctx.forget_manifest,
            ctx.splits["forget"],
            variant,
            ctx.device,
            step,
            ctx.loader,
            ctx.decoded_forget_set(),
        )
    except DivergedError as exc:
        final = f"final loss {losses[-1]:g}; " if losses else ""
        raise DivergedError(f"variant {index} ({variant.label()}): {final}{exc}") from None
    # Only deterministic facts go into the task vector file, so that the same seed gives the
    # same bytes and hash; the time taken goes beside it.
    metadata = {
        "format": "negmerge.task_vector",
        "variant": variant.model_dump_json(),
        "index": str(index),
    }
    stats = VariantStats(
        seconds=time.perf_counter() - began,
        final_loss=losses[-1] if losses else None,
        device_usage=device_usage(ctx.device),  # None on CPU
    )
    stats.write(path.with_suffix(".json"))
    save_file(tau, path, metadata)
    return _variant_record(path)


def _variant_record(path: Path) -> VariantRecord:
    with open_checkpoint(path) as ckpt:
        meta = ckpt.metadata
    return VariantRecord(
        index=int(meta["index"]),
        key=path.stem.split("-", 1)[1],
        hyperparameters=json.loads(meta["variant"]),
        **VariantStats.read(path.with_suffix(".json")).model_dump(),
        tau_sha256=file_sha256(path),
        path=str(path),
    )


def fold_variant(ctx: JobContext, index: int, state: Path | None, output: Path) -> MergeState:
    """Fold variant `index`'s task vector (fine-tuned already) into the running merge state
    `state` (None: a new one), written to `output`; `state` is left as it was. Returns the
    new state's record: its path, sha256 and the variants it holds."""
    variant = ctx.spec.variant_at(index)
    folded = fold_task_vector(
        ctx.spec.merge.method,
        ctx.spec.merge.params,
        ctx.workdir.variant(index, variant),
        index,
        state,
        output,
    )
    return MergeState(
        group=ctx.spec.state_group(index),
        path=str(output),
        sha256=file_sha256(output),
        bytes=output.stat().st_size,
        variants=sorted(folded.variants),
    )


def merge_variants(
    ctx: JobContext,
    round_: int = 0,
    states: Sequence[Path] | None = None,
    records: Sequence[VariantRecord] | None = None,
) -> Merged:
    """Merge round `round_`'s task vectors (streaming) into its merged.safetensors; or, with
    `states`, combine the running merge states that hold them (the variants' `records` then
    come from their fine-tuning, as their task vectors are not kept)."""
    wd = ctx.workdir.at_round(round_)
    wanted = ctx.spec.merged_variants(round_)
    if states is None:
        records = [_variant_record(wd.variant(i, v)) for i, v in wanted]
    elif records is None or sorted(r.index for r in records) != [i for i, _ in wanted]:
        raise NegMergeError(f"merge@{round_}: the variants' records do not match its variants")
    records = sorted(records, key=lambda r: r.index)
    if not wd.merged.exists() and states is None:
        merge_files(
            ctx.spec.merge.method,
            [r.path for r in records],
            wd.merged,
            params=ctx.spec.merge.params,
            input_sha256=[r.tau_sha256 for r in records],
        )
    elif not wd.merged.exists():
        combined = combine_states(states)
        if sorted(combined.variants) != [i for i, _ in wanted]:
            raise NegMergeError(
                f"merge@{round_}: the running merge states hold variants "
                f"{sorted(combined.variants)}, not {[i for i, _ in wanted]}"
            )
        write_merged(combined, wd.merged, [r.tau_sha256 for r in records])
    # Every variant is trained: the forget set's decoded pixels are not needed any more.
    wd.decoded.unlink(missing_ok=True)
    with open_checkpoint(wd.merged) as ckpt:
        meta = ckpt.metadata
        dense_bytes = sum(spec.nbytes for spec in ckpt.specs.values())
    return Merged(
        round=round_,
        method=meta["method"],
        params=json.loads(meta["params"]),
        n=int(meta["n"]),
        kept_fraction=float(meta["kept_fraction"]),
        merged_sha256=file_sha256(wd.merged),
        merged_layout="sparse" if is_sparse(meta) else "dense",
        merged_bytes=wd.merged.stat().st_size,
        merged_dense_bytes=dense_bytes,
        variants=records,
    )


def search(
    ctx: JobContext,
    on_evaluation: Callable[[float, Evaluation], None] | None = None,
    round_: int = 0,
) -> Searched:
    """Choose lambda for round `round_`'s merged vector on the validation splits."""
    wd = ctx.workdir.at_round(round_)
    if wd.search.exists():
        return Searched.read(wd.search)
    began = time.perf_counter()
    vector = load_task_vector(wd.merged)
    rule = ctx.spec.search.rule
    # Held-out data is usually the retain val split itself: measure it once.
    holdout_is_retain = ctx.splits["holdout"] is ctx.splits["retain_val"]

    def evaluate(lam: float) -> Evaluation:
        ctx.set_scale(vector, lam)
        if rule == "confidence-match":
            forget, forget_conf = ctx.accuracy_and_confidence("forget_val")
            held_out, holdout_conf = ctx.accuracy_and_confidence("holdout")
            retain = held_out if holdout_is_retain else ctx.accuracy("retain_val")
            return Evaluation(forget, retain, held_out, forget_conf, holdout_conf)
        retain = ctx.accuracy("retain_val")
        held_out = retain if holdout_is_retain else ctx.accuracy("holdout")
        return Evaluation(
            forget_acc=ctx.accuracy("forget_val"),
            retain_acc=retain,
            holdout_acc=held_out if rule == "holdout-match" else None,
        )

    try:
        result: SearchResult = search_lambda(
            evaluate,
            ctx.spec.search.rule,
            strategy=ctx.spec.search.strategy,
            grid=ctx.spec.search.lambdas(),
            retain_ratio=ctx.spec.search.retain_ratio,
            on_evaluation=on_evaluation,
            max_extensions=ctx.spec.search.max_extensions,
            max_lambda=ctx.spec.search.max_lambda,
            refine=ctx.spec.search.refine,
        )
    finally:
        ctx.set_scale(vector, 0.0)
    found = Searched.model_validate(
        {**result.to_dict(), "round": round_, "seconds": time.perf_counter() - began}
    )
    found.write(wd.search)
    return found


def finalize(
    ctx: JobContext,
    original: Original,
    merged: Merged,
    searched: Searched,
    timings: dict[str, float | None],
    earlier_rounds: Sequence[RoundSummary] = (),
) -> Report:
    """Measure round `merged.round`'s unlearned model, judge it against the job's target,
    write it (unless lambda is 0: the model would be the original, unchanged) and write the
    evidence report, which says whether another round follows (negmerge.escalation).
    `earlier_rounds`: the earlier rounds' summaries (the last report's `rounds`)."""
    round_ = merged.round
    wd = ctx.workdir.at_round(round_)
    if wd.report.exists():
        return Report.read(wd.report)
    lam = searched.lambda_
    began = time.perf_counter()
    if lam != 0 and not wd.model.exists():
        if ctx.model.finetuning == "linear":  # theta0 kept, the delta moves
            apply_tangent_file(wd.base, wd.merged, lam, wd.model, ctx.model.linearized_part)
        else:
            subtract_task_vector_file(wd.base, wd.merged, lam, wd.model)
    vector = load_task_vector(wd.merged)
    # The groups' "before" is the model this job started from (lambda 0), measured here
    # rather than in prepare so that a report of any round has both from one place.
    groups_before = ctx.group_metrics() if ctx.spec.groups else {}
    ctx.set_scale(vector, lam)
    try:
        after = ctx.metrics()
        groups_after = ctx.group_metrics() if ctx.spec.groups else {}
    finally:
        ctx.set_scale(vector, 0.0)
    target, default = ctx.spec.resolved_target()
    verdict = judge(
        target, ctx.spec.target_kind, original.metrics, after, lam, default_target=default
    )
    model = ModelFile(path=str(wd.model), sha256=file_sha256(wd.model)) if lam != 0 else None
    n = ctx.spec.variants_per_round
    this_round = RoundSummary(
        round=round_,
        variants_merged=[v.index for v in merged.variants],
        finetune_seconds=sum(v.seconds or 0.0 for v in merged.variants if v.index // n == round_),
        kept_fraction=merged.kept_fraction,
        lambda_=lam,
        verdict=RoundVerdict(met=verdict.met, reason=verdict.reason),
        model_sha256=model.sha256 if model else None,
    )
    rounds = [*earlier_rounds, this_round]
    timings = {
        **timings,
        "finetune": sum(r.finetune_seconds for r in rounds),  # the variants' own time
        "evaluate_and_store": time.perf_counter() - began,
    }
    stop = (
        "target met"
        if verdict.met
        else ctx.spec.escalation.next_round(round_, n, [r.finetune_seconds for r in rounds])
    )
    report = Report(
        code_version=code_version(),
        job=json.loads(ctx.spec.model_dump_json()),
        seeds=Seeds(
            job=ctx.spec.seed,
            variants=[v.seed for r in range(round_ + 1) for _, v in ctx.spec.round_variants(r)],
        ),
        base_model=BaseModelHashes(
            sha256=original.base_sha256, weights_sha256=original.weights_sha256
        ),
        forget_set=ForgetSetHashes(
            manifest_sha256=original.forget_manifest_sha256, count=original.forget_count
        ),
        split_sizes=original.split_sizes,
        variants=merged.variants,
        merge=merged.summary(),
        search=searched,
        lambda_=lam,
        metrics=BeforeAfter(before=original.metrics, after=after),
        groups={
            name: GroupBeforeAfter(before=groups_before[name], after=groups_after[name])
            for name in ctx.spec.groups
        },
        verdict=verdict,
        round=round_,
        rounds=rounds,
        escalation=EscalationOutcome(next_round=None if stop else round_ + 1, stopped_because=stop),
        # No model at lambda 0: it would be the original's bytes under a new name.
        model=model,
        finetuning=ctx.spec.finetuning,
        timings=timings,
    )
    report.write(wd.report)
    return report


def run_unlearning(
    spec: JobSpec, workdir: str | os.PathLike, progress: Progress | None = None
) -> Report:
    """Run (or resume) the whole job in this process and return the report (its last
    round's)."""
    progress = progress or Progress()
    timings: dict[str, float | None] = {}
    Workdir(Path(workdir)).claim(spec)

    def timed(name: str, call: Callable[[], Returned]) -> Returned:
        progress.stage(name)
        began = time.perf_counter()
        result = call()
        timings[name] = (timings.get(name) or 0.0) + time.perf_counter() - began
        return result

    ctx = timed("load", lambda: JobContext.load(spec, workdir))
    original = timed("prepare", lambda: prepare(ctx))
    round_, earlier = 0, []
    while True:
        variants = spec.round_variants(round_)
        total = variants[-1][0] + 1

        def finetune_all(variants: list = variants, total: int = total) -> None:
            for index, _ in variants:
                finetune_variant(
                    ctx,
                    index,
                    lambda s, t, loss, _rate, i=index: progress.variant_step(i, total, s, t, loss),
                )
                progress.variant_done(index, total)

        timed("finetune", finetune_all)
        merged = timed("merge", lambda r=round_: merge_variants(ctx, r))
        searched = timed("search", lambda r=round_: search(ctx, progress.lambda_evaluated, r))
        progress.stage("evaluate")
        report = finalize(ctx, original, merged, searched, timings, earlier)
        if report.escalation.next_round is None:
            return report
        round_, earlier = report.escalation.next_round, report.rounds
        progress.stage(f"round {round_}")


def code_version() -> str:
    try:
        return version("negmerge-service")
    except PackageNotFoundError:
        return "unknown"
