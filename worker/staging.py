"""A step's files when the artifact root is an object store: staged through local scratch.

The pipeline's stages read and write a work directory (negmerge.workdir.Workdir). With an
object store, each step gets a fresh scratch folder as that work directory: the files the
step reads, and those of its outputs already stored (a step run again after a crash skips
them, as it does on a shared file system), are downloaded and checked against their recorded
sha256; the step runs; its outputs are uploaded; the folder is deleted. So workers share
nothing but the store (and PostgreSQL and Redis), and each keeps at most one step's files.

The merge reads its n task vectors from scratch files, streaming tensor by tensor as it does
from any file (negmerge.merge.streaming): its memory does not grow with n. With running merge
storage (worker.merge_states) there are no task vectors: it downloads the workers' states.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec

from app.artifacts import ArtifactError, ArtifactStore
from app.step_table import VARIANT, VARIANTS, parse_step
from negmerge.errors import NegMergeError
from negmerge.job_spec import JobSpec
from negmerge.workdir import Workdir

_RELATIVE = Workdir(Path())  # the work directory's layout, as paths relative to it


@dataclass(frozen=True)
class StepFiles:
    """Work-directory files of one step: what it reads, and what it writes (in upload
    order: the file whose presence says "done" last)."""

    inputs: list[str]
    outputs: list[str]


def _variant_files(spec: JobSpec, index: int) -> list[str]:
    tau = _RELATIVE.variant(index, spec.variant_at(index))
    return [str(tau.with_suffix(".json")), str(tau)]


def files_of(step: str, spec: JobSpec, folded: bool = False) -> StepFiles:
    """The step's files, as its kind declares them in the step table (app.step_table);
    `folded`: the merge combines running merge states (fetched by worker.merge_states), not
    task vectors."""
    parsed = parse_step(step)
    if parsed is None:
        raise ValueError(f"unknown step {step!r}")
    wd = _RELATIVE.at_round(parsed.round)

    def paths(names: tuple[str, ...]) -> list[str]:
        found: list[str] = []
        for name in names:
            if name == VARIANT:
                found += _variant_files(spec, parsed.number)
            elif name == VARIANTS:
                if not folded:
                    merged = spec.merged_variants(parsed.round)
                    found += [f for i, _ in merged for f in _variant_files(spec, i)]
            else:
                found.append(str(getattr(wd, name)))
        return found

    return StepFiles(paths(parsed.kind.reads), paths(parsed.kind.writes))


def job_prefix(job_id: object) -> str:
    return f"jobs/{job_id}"


class StagedStep:
    """One step's scratch work directory, tied to the job's objects in the store."""

    def __init__(self, store: ArtifactStore, folder: Path, job_id: object, files: StepFiles):
        self.store = store
        self.folder = folder
        self.prefix = job_prefix(job_id)
        self.files = files

    def key(self, relative: str) -> str:
        return f"{self.prefix}/{relative}"

    def download(self, max_bytes: int) -> None:
        """Fetch the inputs (all must be there) and the outputs already stored."""
        with store_errors():
            wanted = {relative: self.key(relative) for relative in self.files.inputs}
            for relative in self.files.outputs:
                if self.store.exists(self.key(relative)):
                    wanted[relative] = self.key(relative)
            total = sum(self.store.size(key) for key in wanted.values())
            if total > max_bytes:
                raise NegMergeError(
                    f"this step needs {total} bytes of scratch space for its inputs, more "
                    f"than NEGMERGE_SCRATCH_MAX_BYTES ({max_bytes}) allows"
                )
            for relative, key in wanted.items():
                self.store.get_file(key, self.folder / relative)

    def upload(self) -> None:
        with store_errors():
            for relative in self.files.outputs:
                path = self.folder / relative
                if path.is_file():
                    self.store.put_file(path, self.key(relative))

    def to_store_uris(self, output: Any) -> Any:
        """`output` with every path inside the scratch folder named by its object's URI
        (the step's record outlives the folder)."""
        if isinstance(output, dict):
            return {k: self.to_store_uris(v) for k, v in output.items()}
        if isinstance(output, list):
            return [self.to_store_uris(v) for v in output]
        if isinstance(output, str) and output.startswith(str(self.folder) + "/"):
            return self.store.uri(self.key(str(Path(output).relative_to(self.folder))))
        return output


@contextmanager
def store_errors() -> Iterator[None]:
    """The store unreachable or refusing (an OSError from fsspec) is an ArtifactError: the
    step is tried again, as for a missing object."""
    try:
        yield
    except OSError as exc:
        raise ArtifactError(f"artifact store: {type(exc).__name__}: {exc}") from exc


@contextmanager
def scratch_folder(scratch_root: str, job_id: object, step: str) -> Iterator[Path]:
    """A fresh folder for one step, deleted when it ends (whatever way it ends); one left
    by a worker killed in the same step on this host is emptied first."""
    job_folder = Path(scratch_root) / str(job_id)
    folder = job_folder / step.replace(":", "-")
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        with suppress(OSError):  # not empty: another of the job's steps runs on this host
            job_folder.rmdir()


def stage_weights(store: ArtifactStore, uri: str, target: Path) -> None:
    """A model's weights on a local path for torch: a store object checked against its
    recorded sha256, or any other fsspec URI copied as it is (prepare hashes it)."""
    key = store.key_of(uri)
    with store_errors():
        if key is not None:
            store.get_file(key, target)
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        with fsspec.open(uri, "rb") as source, open(target, "wb") as out:
            shutil.copyfileobj(source, out, 8 * 1024 * 1024)
