"""A job's steps, declared once: what each kind of step is called, the stage and queue it
runs in, its share of the job's progress, what follows it, and the files it reads and writes.

    prepare -> finetune:0..n-1 (gpu queue) -> merge (sent by the last variant) -> search
            -> finalize -> the job ends (stage storing), or the next round's variants

The services (app.services.steps: claims, fan-out, fan-in, rounds), the queue (app.queue)
and the worker (worker.tasks runs each kind with the runner it registers for it;
worker.staging stages its files) all read this table, so adding a step is one entry here
and its runner there. It holds no torch and no database access.

Names on the wire: a step run once is its kind ("prepare"); a variant's step is
"<kind>:<k>" (variants are numbered across rounds); a round's step is "<kind>" in round 0
and "<kind>@<r>" in round r >= 1.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from app.db.models import JobStage

PREPARE, FINETUNE, MERGE, SEARCH, FINALIZE = "prepare", "finetune", "merge", "search", "finalize"
FIRST_STEP = PREPARE  # sent when a job is submitted; nothing follows into it

# Files a step reads or writes that are not one of the round's work-directory files
# (negmerge.workdir.Workdir's attributes, the others named in the table):
VARIANT = "variant"  # the step's own variant: its task vector and the vector's record
VARIANTS = "variants"  # the task vectors the round merges (or the running merge states)


class Queue(enum.StrEnum):
    CPU = "cpu"  # the default queue (Settings.queue_name)
    GPU = "gpu"  # Settings.gpu_queue_name


class Naming(enum.Enum):
    """How a kind's steps are named; the value separates the kind from the number."""

    ONCE = ""  # "prepare"
    PER_VARIANT = ":"  # "finetune:3"
    PER_ROUND = "@"  # "merge", "merge@2"


class Follow(enum.Enum):
    """What a step's completion creates (of the kind named by its `then`)."""

    EACH_VARIANT = "one step per variant of the job"
    ALL_VARIANTS = "one step of the round in progress, once every variant is DONE"
    SAME_ROUND = "one step of the same round"
    # The runner decides: the job ends, or (its target not met, app.services.steps.start_round)
    # the next round's variants follow.
    NEXT_ROUND = "the next round's variants, if the runner starts one"


@dataclass(frozen=True)
class StepKind:
    name: str
    stage: JobStage  # the job's stage while the step runs
    queue: Queue
    starts_at: float  # the job's percent when the step starts...
    share: float  # ...and how much it adds (a per-variant kind: shared among the variants)
    naming: Naming
    then: str  # the kind that follows
    follow: Follow
    reads: tuple[str, ...] = ()  # Workdir attributes, VARIANT or VARIANTS
    writes: tuple[str, ...] = ()  # the same, in upload order: the one that says "done" last

    def percent_after(self, done: int = 1, total: int = 1) -> float:
        """Where the job is once `done` of this kind's `total` steps are done."""
        return self.starts_at + self.share * done / max(total, 1)

    @property
    def prefix(self) -> str:
        """What every step name of this kind starts with."""
        return self.name + self.naming.value if self.naming is Naming.PER_VARIANT else self.name


STEPS: dict[str, StepKind] = {
    kind.name: kind
    for kind in (
        StepKind(
            PREPARE,
            JobStage.PREPARING,
            Queue.CPU,
            starts_at=0.0,
            share=10.0,
            naming=Naming.ONCE,
            then=FINETUNE,
            follow=Follow.EACH_VARIANT,
            writes=("base", "original"),
        ),
        StepKind(
            FINETUNE,
            JobStage.FINETUNING,
            Queue.GPU,
            starts_at=10.0,
            share=70.0,
            naming=Naming.PER_VARIANT,
            then=MERGE,
            follow=Follow.ALL_VARIANTS,
            writes=(VARIANT,),
        ),
        StepKind(
            MERGE,
            JobStage.MERGING,
            Queue.CPU,
            starts_at=80.0,
            share=5.0,
            naming=Naming.PER_ROUND,
            then=SEARCH,
            follow=Follow.SAME_ROUND,
            reads=(VARIANTS,),
            writes=("merged",),
        ),
        StepKind(
            SEARCH,
            JobStage.SEARCHING,
            Queue.CPU,
            starts_at=85.0,
            share=10.0,
            naming=Naming.PER_ROUND,
            then=FINALIZE,
            follow=Follow.SAME_ROUND,
            reads=("merged",),
            writes=("search",),
        ),
        StepKind(
            FINALIZE,
            JobStage.EVALUATING,
            Queue.CPU,
            starts_at=95.0,
            share=5.0,
            naming=Naming.PER_ROUND,
            then=FINETUNE,
            follow=Follow.NEXT_ROUND,
            reads=("base", "merged"),
            writes=("model", "report"),
        ),
    )
}


@dataclass(frozen=True)
class Step:
    """A step's name taken apart: its kind and number (a variant's index, or the round)."""

    kind: StepKind
    number: int = 0

    @property
    def name(self) -> str:
        return step_name(self.kind.name, self.number)

    @property
    def round(self) -> int:
        """The step's round; 0 for a kind that is not run per round."""
        return self.number if self.kind.naming is Naming.PER_ROUND else 0

    @property
    def variant(self) -> int | None:
        return self.number if self.kind.naming is Naming.PER_VARIANT else None


def step_name(kind: str, number: int = 0) -> str:
    """The name on the wire of step `number` (variant or round) of `kind`."""
    naming = STEPS[kind].naming
    if naming is Naming.ONCE and number:
        raise ValueError(f"{kind} runs once: it has no step {number}")
    if naming is Naming.PER_VARIANT or (naming is Naming.PER_ROUND and number):
        return f"{kind}{naming.value}{number}"
    return kind


def parse_step(name: str) -> Step | None:
    """The step `name` names, or None if it is no step's name (a stray or garbled message)."""
    kind = STEPS.get(name)
    if kind is not None:
        return Step(kind) if kind.naming is not Naming.PER_VARIANT else None
    for naming in (Naming.PER_VARIANT, Naming.PER_ROUND):
        base, separator, number = name.partition(naming.value)
        kind = STEPS.get(base)
        if separator and kind is not None and kind.naming is naming and number.isdecimal():
            step = Step(kind, int(number))
            return step if step.name == name else None  # only one spelling: no "merge@0", "@01"
    return None


def finetune_step(index: int) -> str:
    """Variant `index`'s step."""
    return step_name(FINETUNE, index)


def round_step(kind: str, round_: int) -> str:
    """merge, search or finalize of round `round_`: "merge" for round 0, "merge@1" after."""
    return step_name(kind, round_)


def variant_index(name: str) -> int | None:
    """k for "finetune:k", else None."""
    step = parse_step(name)
    return step.variant if step is not None else None


def stage_of(name: str) -> JobStage | None:
    """The job's stage while step `name` runs; None if `name` is no step's."""
    step = parse_step(name)
    return step.kind.stage if step is not None else None
