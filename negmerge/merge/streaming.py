"""The merge engine: n task vectors, one slice of one tensor at a time.

For every slice of every tensor, the slices of all n task vectors are read and reduced, and the
merged slice is appended to the output file. Memory is a few slice buffers (no full tensor, let
alone a full model), so a merge of 30 checkpoints needs no more memory than a merge of 2. A
reader thread fills the next slice's buffers while the current one is reduced; pread and torch
both release the GIL, so reading, hashing and arithmetic overlap.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from negmerge.errors import MergeError
from negmerge.io import Checkpoint, SafetensorsWriter, TensorSpec, open_checkpoint
from negmerge.merge.base import Chunk, MergeMethod, State, get_method
from negmerge.task_vector import check_same_layout, float_keys

# Inputs are read in chunks of 1 MiB of fp32 (page-cache reads peaked at that size: 17.6 GB/s
# against 14.9 at 256 KiB and 10.6 at 4 MiB) and reduced in slices of 256 KiB, whose working
# set (slice, sum, min, max) stays in L2 (0.24 ns per element and input, against 0.32 ns at
# 1 MiB slices). Buffers: two sets of one chunk per input, 2 MiB per input in all.
CHUNK_ELEMENTS = 1 << 18
SLICE_ELEMENTS = 1 << 16
OUTPUT_FORMAT = "negmerge.task_vector"


@dataclass
class MergeResult:
    """What a merge did: the method, its inputs' hashes, and how much of tau it kept."""

    method: str
    params: dict[str, object]
    n: int
    kept_fraction: float
    kept_per_tensor: dict[str, float]
    input_sha256: list[str] = field(default_factory=list)
    pretrained_sha256: str | None = None
    output: str | None = None
    seconds: float = 0.0
    tensors: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, object]:
        """Everything but the tensors (asdict would deep-copy them first)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "tensors"}


def merge_chunk(method: MergeMethod, chunk: Chunk, n: int) -> torch.Tensor:
    """The merged values of one chunk, reduced slice by cache-sized slice."""
    size = chunk.stop - chunk.start
    if size <= SLICE_ELEMENTS:
        return method.finish(reduce_chunk(method, chunk.taus, chunk.indices), n)
    merged = torch.empty(size)
    for start in range(0, size, SLICE_ELEMENTS):
        stop = min(start + SLICE_ELEMENTS, size)
        taus = [tau[start:stop] for tau in chunk.taus]
        merged[start:stop] = method.finish(reduce_chunk(method, taus, chunk.indices), n)
    return merged


def reduce_chunk(
    method: MergeMethod, taus: Sequence[torch.Tensor], indices: Sequence[int]
) -> State:
    """Fold the task vectors' slices, in order, into the method's state."""
    state = method.start(taus[0], indices[0])
    for tau, index in zip(taus[1:], indices[1:], strict=True):
        method.add(state, tau, index)
    return state


class _KeptCounter:
    def __init__(self, specs: Mapping[str, TensorSpec]) -> None:
        self._numel = {key: spec.numel for key, spec in specs.items()}
        self._kept = dict.fromkeys(specs, 0)

    def count(self, key: str, merged: torch.Tensor) -> None:
        self._kept[key] += int(merged.bool().sum())  # 10x faster than count_nonzero here

    def per_tensor(self) -> dict[str, float]:
        return {key: kept / max(self._numel[key], 1) for key, kept in self._kept.items()}

    def overall(self) -> float:
        return sum(self._kept.values()) / max(sum(self._numel.values()), 1)


class MergeInputs:
    """The n task vectors of a merge, read from files slice by slice.

    Either fine-tuned checkpoints and their pretrained base (tau_k = theta_k - theta_pre), or
    task-vector files (tau_k as stored). Only floating-point tensors take part.
    """

    def __init__(
        self,
        paths: Sequence[str | os.PathLike],
        pretrained: str | os.PathLike | None = None,
        hashing: bool = True,
    ) -> None:
        if not paths:
            raise MergeError("no task vectors given (n = 0)")
        self.base: Checkpoint | None = None
        self.sources: list[Checkpoint] = []
        try:
            if pretrained is not None:
                self.base = open_checkpoint(pretrained, hashing)
            for path in paths:
                self.sources.append(open_checkpoint(path, hashing))
            reference = self.base or self.sources[0]
            for source in self.sources:
                if source is not reference:
                    check_same_layout(reference, source)
        except BaseException:
            self.close()
            raise
        self.specs = {key: reference.specs[key] for key in float_keys(reference.specs)}
        if not self.specs:
            raise MergeError(f"{reference.path}: holds no floating-point tensors to merge")

    @property
    def n(self) -> int:
        return len(self.sources)

    def stream(
        self, indices: Sequence[int], chunk_elements: int = CHUNK_ELEMENTS
    ) -> Iterator[Chunk]:
        """Every slice of every tensor, with the selected task vectors' values as fp32."""
        plan = [
            (key, start, min(start + chunk_elements, spec.numel))
            for key, spec in self.specs.items()
            for start in range(0, spec.numel, chunk_elements)
        ]
        if not plan:
            return
        buffers = [self._buffers(len(indices), chunk_elements) for _ in range(2)]
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="negmerge-read") as reader:
            pending = reader.submit(self._load, plan[0], indices, buffers[0])
            for i in range(len(plan)):
                chunk = pending.result()
                if i + 1 < len(plan):  # fill the other buffer set while this chunk is used
                    pending = reader.submit(self._load, plan[i + 1], indices, buffers[(i + 1) % 2])
                yield chunk

    def _buffers(self, count: int, elements: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        # fp32 tensors are read straight into the fp32 buffer; others need room to convert from.
        other = [s.dtype.itemsize for s in self.specs.values() if s.dtype != torch.float32]
        raw_bytes = elements * max(other, default=0)
        return [
            (torch.empty(elements, dtype=torch.float32), torch.empty(raw_bytes, dtype=torch.uint8))
            for _ in range(count + 1)  # the last pair holds the base
        ]

    def _load(
        self,
        item: tuple[str, int, int],
        indices: Sequence[int],
        buffers: list[tuple[torch.Tensor, torch.Tensor]],
    ) -> Chunk:
        key, start, stop = item
        base = None if self.base is None else _read_fp32(self.base, key, start, stop, buffers[-1])
        taus = []
        for index, buffer in zip(indices, buffers, strict=False):
            tau = _read_fp32(self.sources[index], key, start, stop, buffer)
            if base is not None:
                tau.sub_(base)
            taus.append(tau)
        return Chunk(key, start, stop, indices, taus)

    def sha256s(self) -> list[str]:
        return [source.sha256() for source in self.sources]

    def close(self) -> None:
        for ckpt in [self.base, *self.sources]:
            if ckpt is not None:
                ckpt.close()

    def __enter__(self) -> MergeInputs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read_fp32(
    ckpt: Checkpoint, key: str, start: int, stop: int, buffer: tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    fp32, raw = buffer
    out = fp32[: stop - start]
    if ckpt.specs[key].dtype == torch.float32:
        value = ckpt.read(key, start, stop, buffer=fp32.view(torch.uint8))
    else:
        value = ckpt.read(key, start, stop, buffer=raw)
    if value.data_ptr() != out.data_ptr():  # not read in place (another dtype, a .pt file)
        out.copy_(value)
    return out


def merge_files(
    method: str | MergeMethod,
    inputs: Sequence[str | os.PathLike],
    output: str | os.PathLike,
    pretrained: str | os.PathLike | None = None,
    params: Mapping[str, object] | None = None,
    chunk_elements: int = CHUNK_ELEMENTS,
    on_progress: Callable[[int, int], None] | None = None,
    input_sha256: Sequence[str] | None = None,
    pretrained_sha256: str | None = None,
) -> MergeResult:
    """Merge the task vectors of `inputs` into a task-vector file at `output`, streaming.

    With `pretrained`, inputs are fine-tuned checkpoints and tau_k = theta_k - theta_pre;
    without, they are task-vector files. The output is fp32 safetensors whose metadata records
    the method, its parameters, n, the inputs' sha256 and the kept fraction.
    `on_progress(done_bytes, total_bytes)` is called as the final pass goes.

    Hashing the inputs costs more CPU than reading them; callers that know the hashes already
    (content-addressed artifacts) pass `input_sha256` (and `pretrained_sha256`) instead.
    """
    began = time.perf_counter()
    with _one_intra_op_thread():
        return _merge_files(
            method,
            inputs,
            output,
            pretrained,
            params,
            chunk_elements,
            on_progress,
            input_sha256,
            pretrained_sha256,
            began,
        )


@contextmanager
def _one_intra_op_thread() -> Iterator[None]:
    """The engine keeps two cores busy itself (the reader and the reducer); torch's intra-op
    pool on top oversubscribes them and made the reducer three to four times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _merge_files(
    method: str | MergeMethod,
    inputs: Sequence[str | os.PathLike],
    output: str | os.PathLike,
    pretrained: str | os.PathLike | None,
    params: Mapping[str, object] | None,
    chunk_elements: int,
    on_progress: Callable[[int, int], None] | None,
    input_sha256: Sequence[str] | None,
    pretrained_sha256: str | None,
    began: float,
) -> MergeResult:
    known = input_sha256 is not None and (pretrained is None or pretrained_sha256 is not None)
    if input_sha256 is not None and len(input_sha256) != len(inputs):
        raise MergeError(f"input_sha256: {len(input_sha256)} hashes for {len(inputs)} inputs")
    with MergeInputs(inputs, pretrained, hashing=not known) as data:
        if isinstance(method, str):
            method = get_method(method, data.n, **dict(params or {}))
        indices = method.inputs()
        method.prepare(lambda: data.stream(indices, chunk_elements))
        out_specs = {key: TensorSpec(torch.float32, spec.shape) for key, spec in data.specs.items()}
        total = sum(spec.nbytes for spec in out_specs.values())
        kept = _KeptCounter(out_specs)
        metadata = {
            "format": OUTPUT_FORMAT,
            "method": method.name,
            "params": json.dumps(method.params.model_dump(), sort_keys=True),
            "n": str(data.n),
        }
        with SafetensorsWriter(output, out_specs, metadata, reserve=256 + 96 * data.n) as writer:
            done = 0
            for chunk in data.stream(indices, chunk_elements):
                merged = merge_chunk(method, chunk, data.n)
                kept.count(chunk.key, merged)
                writer.write(chunk.key, merged)
                done += merged.numel() * 4
                if on_progress is not None:
                    on_progress(done, total)
            hashes = list(input_sha256) if known else data.sha256s()
            base_hash = None
            if data.base is not None:
                base_hash = pretrained_sha256 if known else data.base.sha256()
            writer.metadata.update(
                input_sha256=json.dumps(hashes),
                kept_fraction=f"{kept.overall():.6f}",
                **({"pretrained_sha256": base_hash} if base_hash else {}),
            )
    return MergeResult(
        method=method.name,
        params=method.params.model_dump(),
        n=data.n,
        kept_fraction=kept.overall(),
        kept_per_tensor=kept.per_tensor(),
        input_sha256=hashes,
        pretrained_sha256=base_hash,
        output=str(Path(output)),
        seconds=time.perf_counter() - began,
    )


def merge_task_vectors(
    method: str | MergeMethod,
    vectors: Sequence[Mapping[str, torch.Tensor]],
    params: Mapping[str, object] | None = None,
) -> MergeResult:
    """Merge task vectors held in memory (dicts of tensors); the result's `tensors` are fp32.

    The same methods and rules as `merge_files`, for models small enough to hold n copies.
    """
    began = time.perf_counter()
    if not vectors:
        raise MergeError("no task vectors given (n = 0)")
    if isinstance(method, str):
        method = get_method(method, len(vectors), **dict(params or {}))
    specs = common_specs(vectors)
    indices = method.inputs()
    method.prepare(lambda: iter_memory_chunks(vectors, specs, indices))
    kept = _KeptCounter(specs)
    merged = {}
    for chunk in iter_memory_chunks(vectors, specs, indices):
        values = merge_chunk(method, chunk, len(vectors))
        kept.count(chunk.key, values)
        merged[chunk.key] = values.reshape(specs[chunk.key].shape)
    return MergeResult(
        method=method.name,
        params=method.params.model_dump(),
        n=len(vectors),
        kept_fraction=kept.overall(),
        kept_per_tensor=kept.per_tensor(),
        seconds=time.perf_counter() - began,
        tensors=merged,
    )


def common_specs(vectors: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, TensorSpec]:
    reference = vectors[0]
    for k, vector in enumerate(vectors[1:], start=2):
        for key, tensor in reference.items():
            other = vector.get(key)
            if other is None or other.shape != tensor.shape:
                found = "missing" if other is None else f"shaped {list(other.shape)}"
                raise MergeError(f"task vector {k}: key {key!r} is {found}")
        extra = [key for key in vector if key not in reference]
        if extra:
            raise MergeError(f"task vector {k}: key {extra[0]!r} is not in task vector 1")
    return {
        key: TensorSpec(torch.float32, tuple(t.shape))
        for key, t in reference.items()
        if t.is_floating_point()
    }


def iter_memory_chunks(
    vectors: Sequence[Mapping[str, torch.Tensor]],
    specs: Mapping[str, TensorSpec],
    indices: Sequence[int],
) -> Iterator[Chunk]:
    for key, spec in specs.items():
        taus = [vectors[i][key].detach().reshape(-1).float() for i in indices]
        yield Chunk(key, 0, spec.numel, indices, taus)
