"""A job's work directory: the paths where its stages keep their outputs, and the atomic write
of a JSON output (negmerge.pipeline skips what is there, so what is there must be whole).
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

from negmerge.errors import NegMergeError
from negmerge.job_spec import JobSpec
from negmerge.variants import Variant


@dataclass
class Workdir:
    """Where a job keeps its stages' outputs. The base model, the original's metrics and the
    variants are the job's; the merged vector, the search, the model and the report are a
    round's (round 0 at the top, later ones under rounds/<r>/)."""

    root: Path
    round: int = 0

    def __post_init__(self) -> None:
        self.root = Path(self.root)

    def at_round(self, round_: int) -> Workdir:
        return Workdir(self.root, round_)

    @property
    def _own(self) -> Path:
        return self.root if self.round == 0 else self.root / "rounds" / str(self.round)

    job = property(lambda self: self.root / "job.json")
    base = property(lambda self: self.root / "base.safetensors")
    original = property(lambda self: self.root / "original.json")
    merged = property(lambda self: self._own / "merged.safetensors")
    search = property(lambda self: self._own / "search.json")
    model = property(lambda self: self._own / "model.safetensors")
    report = property(lambda self: self._own / "report.json")
    # The forget set decoded at the model's input size, shared by the variants; deleted
    # once they are merged.
    decoded = property(lambda self: self.root / "decoded.safetensors")

    def variant(self, index: int, variant: Variant) -> Path:
        return self.root / "variants" / f"{index:03d}-{variant.key()}.safetensors"

    def state(self, group: int, name: str) -> Path:
        """A running merge state of state group `group` (JobSpec.state_group)."""
        return self.root / "states" / str(group) / f"{name}.safetensors"

    def claim(self, spec: JobSpec) -> None:
        """Create the work directory for `spec`, or check that it already belongs to it. One
        that holds another job but none of its outputs (an attempt that failed before its
        first stage, e.g. on a typo in the job file) is taken over."""
        self.root.mkdir(parents=True, exist_ok=True)
        wanted = json.loads(spec.model_dump_json())
        if self.job.exists():
            held = json.loads(self.job.read_text())
            if held == wanted:
                return  # the same job: resume it
            outputs = [p for p in self.root.rglob("*") if p.is_file() and p != self.job]
            if outputs:
                raise NegMergeError(self._held_by_another(held, wanted))
        write_json_atomic(self.job, wanted)

    def _held_by_another(self, held: dict, wanted: dict) -> str:
        changed = sorted(
            key for key in held.keys() | wanted.keys() if held.get(key) != wanted.get(key)
        )
        return (
            f"{self.root} holds the outputs of another job (its job differs in: "
            f"{', '.join(changed)}). To resume that job, run the job it was started with, "
            f"which is kept there: negmerge unlearn {self.job} --workdir {self.root}. "
            f"To run this one from the start, give another --workdir, or delete {self.root}"
        )


def write_json_atomic(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")  # writers may race
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False))
    os.replace(tmp, path)
