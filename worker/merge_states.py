"""Running merge states: a job's storage stays (workers + 1) x the model, whatever n is.

With NEGMERGE_MERGE_STORAGE=running (the default, for the methods that allow it:
negmerge.merge.running), a fine-tuning step does not keep its task vector. It folds it into
its worker's current merge state, written as a new artifact
(jobs/<job>/states/<group>/<worker>-<count>-<random>.safetensors), and the step's output
records the new state and the variants it holds. The database says which state is current:
the one the worker's latest finished variant recorded (app.services.steps.merge_states). So:

- a worker killed mid-variant, or one whose lease was lost, leaves its current state as it
  was (its new file is recorded by no step, and deleted), and the variant run again is
  folded once, by whoever runs it;
- a duplicate message finds the step done or held and folds nothing;
- the merge combines the current states of the round's group (JobSpec.state_group), which
  hold exactly its variants, or refuses.

A worker is a pool slot of a Celery worker (host, parent process, slot): the fresh child
each step gets continues the chain of the child before it.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import uuid
from pathlib import Path
from typing import Any

import billiard.process

from app.artifacts import ArtifactStore
from app.services import steps
from app.settings import Settings
from negmerge.context import JobContext
from negmerge.job_spec import JobSpec
from negmerge.merge.running import supports_running
from negmerge.pipeline import fold_variant
from negmerge.stage_outputs import MergeState, VariantRecord
from worker.staging import job_prefix, store_errors


def worker_name() -> str:
    """This process's chain of merge states: its worker's host and process and its pool
    slot (a plain process outside a pool: its own id)."""
    host = re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname())[:40]
    slot = getattr(billiard.process.current_process(), "index", None)
    if slot is None:
        return f"{host}-{os.getpid()}"
    return f"{host}-{os.getppid()}-{slot}"


def running_storage(settings: Settings, spec: JobSpec) -> bool:
    """Whether this job's variants are folded into running merge states."""
    return settings.merge_storage == "running" and supports_running(spec.merge.method)


def fold(
    store: ArtifactStore,
    db_session_scope: Any,
    job_id: uuid.UUID,
    ctx: JobContext,
    record: VariantRecord,
    keep_task_vector: bool,
) -> VariantRecord:
    """Fold the fine-tuned variant of `record` into this worker's current merge state; the
    variant's output with the new state (`merge_state`). Its task vector is deleted unless
    it is to be kept. `db_session_scope()`: a unit of work on the database."""
    index = record.index
    group = ctx.spec.state_group(index)
    worker = worker_name()
    with db_session_scope() as session:
        current = _states(steps.merge_states(session, job_id, group)).get(worker)
    held = None
    if current is not None:
        held = local_copy(store, current.path, ctx.workdir.root, job_id)
    count = len(current.variants) + 1 if current else 1
    output = ctx.workdir.state(group, f"{worker}-{count:03d}-{uuid.uuid4().hex[:8]}")
    output.parent.mkdir(parents=True, exist_ok=True)
    state = fold_variant(ctx, index, held, output)
    if store.remote:  # the step's output names it by its URI (StagedStep.to_store_uris)
        with store_errors():
            store.put_file(output, _key(job_id, ctx.workdir.root, output))
    state = state.model_copy(
        update={"worker": worker, "replaces": current.path if current else None}
    )
    folded = record.model_copy(update={"merge_state": state})
    if not keep_task_vector and record.path is not None:
        Path(record.path).unlink(missing_ok=True)  # before it is uploaded
        folded = folded.model_copy(update={"path": None})
    return folded


def settle(
    store: ArtifactStore, db_session_scope: Any, job_id: uuid.UUID, state: MergeState
) -> None:
    """After the variant's step was recorded (or not): delete the state it replaced, or,
    if it is not the worker's current one (the lease was lost), the new state itself."""
    with db_session_scope() as session:
        current = _states(steps.merge_states(session, job_id, state.group)).get(state.worker)
    if current is not None and current.path == state.path:
        if state.replaces:
            delete_artifact(store, state.replaces)
    else:
        delete_artifact(store, state.path)


def current_states(
    db_session_scope: Any, job_id: uuid.UUID, spec: JobSpec, round_: int
) -> tuple[list[MergeState], list[VariantRecord]] | tuple[None, None]:
    """(states, records) for merge@`round_`: the current states of its group and its
    variants' records; (None, None) if a variant was not folded (task vectors stored)."""
    wanted = [i for i, _ in spec.merged_variants(round_)]
    with db_session_scope() as session:
        outputs = steps.variant_outputs(session, job_id)
        records = [outputs.get(i) for i in wanted]
        if any(r is None or "merge_state" not in r for r in records):
            return None, None
        group = spec.state_group(wanted[-1])
        states = list(_states(steps.merge_states(session, job_id, group)).values())
    variants = [VariantRecord.model_validate(r) for r in records]
    return states, [v.model_copy(update={"merge_state": None}) for v in variants]


def _states(recorded: dict[str, dict[str, Any]]) -> dict[str, MergeState]:
    """The merge states the variants' steps recorded (app.services.steps.merge_states)."""
    return {worker: MergeState.model_validate(state) for worker, state in recorded.items()}


def local_copy(store: ArtifactStore, path: str, root: Path, job_id: uuid.UUID) -> Path:
    """A state file on a local path: itself on a shared file system, else downloaded into
    the step's work directory `root` (checked against its recorded sha256)."""
    if not store.remote:
        return Path(path)
    key = store.key_of(path)
    prefix = job_prefix(job_id) + "/"
    target = root / key.removeprefix(prefix)
    with store_errors():
        store.get_file(key, target)
    return target


def delete_artifact(store: ArtifactStore, path: str) -> None:
    key = store.key_of(path) if store.remote else None
    if key is not None:
        store.delete(key)
    else:
        Path(path).unlink(missing_ok=True)


def delete_states(
    store: ArtifactStore, job_id: uuid.UUID, workdir: Path, group: int | None = None
) -> None:
    """The job's merge states of `group` (None: all of them), once no merge needs them."""
    relative = "states" if group is None else f"states/{group}"
    if store.remote:
        with store_errors():
            store.delete_prefix(f"{job_prefix(job_id)}/{relative}")
    else:
        shutil.rmtree(workdir / relative, ignore_errors=True)


def _key(job_id: uuid.UUID, root: Path, path: Path) -> str:
    return f"{job_prefix(job_id)}/{path.relative_to(root)}"
