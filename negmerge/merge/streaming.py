"""The merge engine: n task vectors, one slice of one tensor at a time.

Each input file is viewed through a read-only mmap: its pages are in the page cache already, so
reducing straight from them skips the copy a read() would make. A chunk of elements (the same
range of every input) is one task: a pool of threads merges chunks side by side (numpy releases
the GIL), each reducing its chunk in cache-sized slices; the chunk's mapped pages are handed
back once it is written, so memory is a few MiB per input and never a whole tensor. The
calling thread writes the merged chunks in order. Input hashes, when the caller does not know
them, are computed on threads of their own alongside.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from negmerge.errors import MergeError
from negmerge.io import (
    Checkpoint,
    SafetensorsWriter,
    TensorSpec,
    check_same_layout,
    float_keys,
    open_checkpoint,
    refuse_overwriting,
)
from negmerge.merge.base import (
    Chunk,
    MergeMethod,
    NonFiniteInput,
    get_method,
    reduce_chunk,  # noqa: F401 (its home before base.py)
)
from negmerge.sparse import SparseWriter, convert

if TYPE_CHECKING:
    import torch

# Slices of 64K elements: a slice's working set (tau, sum, min, max: 1 MiB) stays in L2.
# Chunks: mapped memory per task is bounded (CHUNK_BYTES over all inputs), whatever n is.
SLICE_ELEMENTS = 1 << 16
CHUNK_BYTES = 16 << 20
MAX_CHUNK_ELEMENTS = 1 << 20
OUTPUT_FORMAT = "negmerge.task_vector"
_HASH_BLOCK = 8 << 20


def merge_threads() -> int:
    """Threads that merge chunks (and that hash inputs): one per core this process may use,
    at most four (beyond that, memory bandwidth is the limit)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(4, cores or 1))


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
    layout: str | None = None  # of the output file: "sparse" or "dense"
    output_bytes: int = 0  # the output file's size
    dense_bytes: int = 0  # the merged tensors' bytes dense (a dense file's data)
    tensors: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, object]:
        """Everything but the tensors (asdict would deep-copy them first)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "tensors"}


def merge_chunk(method: MergeMethod, chunk: Chunk, n: int) -> np.ndarray:
    """The merged float32 values of one chunk, reduced slice by cache-sized slice."""
    size = chunk.stop - chunk.start
    merged = np.empty(size, np.float32)
    with np.errstate(all="ignore"):  # inf and NaN are results here, as in torch, not warnings
        for lo in range(0, size, SLICE_ELEMENTS):
            hi = min(lo + SLICE_ELEMENTS, size)
            state = reduce_chunk(method, chunk.taus(lo, hi), chunk.indices, chunk.key)
            merged[lo:hi] = method.finish(state, n)
    return merged


def kept_count(merged: np.ndarray) -> int:
    """Non-zero elements (NaN counts, -0.0 does not). Comparing first is 3x faster than
    count_nonzero on floats."""
    return int(np.count_nonzero(merged != 0))


class _KeptCounter:
    def __init__(self, specs: Mapping[str, TensorSpec]) -> None:
        self._numel = {key: spec.numel for key, spec in specs.items()}
        self._kept = dict.fromkeys(specs, 0)

    def add(self, key: str, kept: int) -> None:
        self._kept[key] += kept

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
        self, paths: Sequence[str | os.PathLike], pretrained: str | os.PathLike | None = None
    ) -> None:
        if not paths:
            raise MergeError("no task vectors given (n = 0)")
        self.base: Checkpoint | None = None
        self.sources: list[Checkpoint] = []
        try:  # no hashing while reading: the engine hashes files on threads of their own
            if pretrained is not None:
                self.base = open_checkpoint(pretrained, hashing=False)
            for path in paths:
                self.sources.append(open_checkpoint(path, hashing=False))
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

    def plan(self, chunk_elements: int | None = None) -> list[tuple[str, int, int]]:
        """(key, start, stop) of every chunk, in file order."""
        if chunk_elements is None:  # bounded mapped memory per chunk, whatever n is
            per_input = CHUNK_BYTES // (4 * (self.n + 1))
            chunk_elements = min(MAX_CHUNK_ELEMENTS, max(SLICE_ELEMENTS, per_input))
            chunk_elements -= chunk_elements % SLICE_ELEMENTS
        return [
            (key, start, min(start + chunk_elements, spec.numel))
            for key, spec in self.specs.items()
            for start in range(0, spec.numel, chunk_elements)
        ]

    def chunk(self, item: tuple[str, int, int], indices: Sequence[int]) -> Chunk:
        """Views of one chunk of the selected inputs; `release_item` it when done."""
        key, start, stop = item
        base = None if self.base is None else self.base.view(key, start, stop)
        values = [self.sources[i].view(key, start, stop) for i in indices]
        return Chunk(key, start, stop, indices, values, base, self.specs[key].dtype)

    def stream(self, indices: Sequence[int], chunk_elements: int | None = None) -> Iterator[Chunk]:
        """Every chunk of every tensor, in order, on this thread (for whole-model passes)."""
        for item in self.plan(chunk_elements):
            try:
                yield self.chunk(item, indices)
            finally:
                self.release_item(item, indices)

    def release_item(self, item: tuple[str, int, int], indices: Sequence[int]) -> None:
        """Hand back the mapped pages of a chunk (a view still in use just maps them again)."""
        key, start, stop = item
        for ckpt in [self.base, *(self.sources[i] for i in indices)]:
            if ckpt is not None:
                ckpt.release(key, start, stop)

    def merged(
        self,
        method: MergeMethod,
        indices: Sequence[int],
        chunk_elements: int | None = None,
        threads: int | None = None,
    ) -> Iterator[tuple[str, np.ndarray, int]]:
        """(key, merged values, kept count) of every chunk, in order, merged on `threads`
        threads, at most one chunk per thread ahead of the caller."""
        threads = threads or merge_threads()
        with ThreadPoolExecutor(threads, thread_name_prefix="negmerge-merge") as pool:
            pending: deque[tuple[tuple[str, int, int], Future]] = deque()
            try:
                for item in self.plan(chunk_elements):
                    pending.append((item, pool.submit(self._merge_one, method, item, indices)))
                    if len(pending) > threads:
                        yield self._done(*pending.popleft(), indices)
                while pending:
                    yield self._done(*pending.popleft(), indices)
            finally:
                for _, future in pending:
                    future.cancel()

    def _merge_one(
        self, method: MergeMethod, item: tuple[str, int, int], indices: Sequence[int]
    ) -> tuple[str, np.ndarray, int]:
        merged = merge_chunk(method, self.chunk(item, indices), self.n)
        return item[0], merged, kept_count(merged)

    def _done(
        self, item: tuple[str, int, int], future: Future, indices: Sequence[int]
    ) -> tuple[str, np.ndarray, int]:
        try:
            return future.result()
        finally:  # in plan order, so that nothing still in use is released
            self.release_item(item, indices)

    def close(self) -> None:
        for ckpt in [self.base, *self.sources]:
            if ckpt is not None:
                ckpt.close()

    def __enter__(self) -> MergeInputs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Hashes:
    """sha256 of files, computed on a thread pool while the merge runs (hashlib releases the
    GIL); stops early if the merge fails."""

    def __init__(self, paths: Sequence[Path], threads: int) -> None:
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="negmerge-hash")
        self._futures = [self._pool.submit(self._sha256, path) for path in paths]

    def _sha256(self, path: Path) -> str:
        import hashlib

        digest = hashlib.sha256()
        buffer = bytearray(_HASH_BLOCK)
        view = memoryview(buffer)
        with open(path, "rb", buffering=0) as f:
            while not self._stop.is_set() and (got := f.readinto(view)):
                digest.update(view[:got])
        return digest.hexdigest()

    def result(self) -> list[str]:
        return [future.result() for future in self._futures]

    def close(self) -> None:
        self._stop.set()
        self._pool.shutdown(wait=True, cancel_futures=True)


def merge_files(
    method: str | MergeMethod,
    inputs: Sequence[str | os.PathLike],
    output: str | os.PathLike,
    pretrained: str | os.PathLike | None = None,
    params: Mapping[str, object] | None = None,
    chunk_elements: int | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    input_sha256: Sequence[str] | None = None,
    pretrained_sha256: str | None = None,
    layout: str = "auto",
) -> MergeResult:
    """Merge the task vectors of `inputs` into a task-vector file at `output`, streaming.

    With `pretrained`, inputs are fine-tuned checkpoints and tau_k = theta_k - theta_pre;
    without, they are task-vector files. The output is fp32 safetensors (sparse or dense, see
    `layout`) whose metadata records the method, its parameters, n, the inputs' sha256 and the
    kept fraction.
    `on_progress(done_bytes, total_bytes)` is called as the final pass goes.

    Hashing the inputs costs more CPU than merging them; callers that know the hashes already
    (content-addressed artifacts) pass `input_sha256` (and `pretrained_sha256`) instead.

    `layout`: "sparse" writes a negmerge.sparse file (a bitmask and the kept values per
    tensor), "dense" a plain one; "auto" writes sparse and rewrites it dense in the rare case
    that is smaller (a method that keeps nearly every element).
    """
    if layout not in ("auto", "sparse", "dense"):
        raise MergeError(f"layout: {layout!r} is not one of auto, sparse, dense")
    began = time.perf_counter()
    refuse_overwriting(output, [*inputs, *([pretrained] if pretrained is not None else [])])
    known = input_sha256 is not None and (pretrained is None or pretrained_sha256 is not None)
    if input_sha256 is not None and len(input_sha256) != len(inputs):
        raise MergeError(f"input_sha256: {len(input_sha256)} hashes for {len(inputs)} inputs")
    with MergeInputs(inputs, pretrained) as data:
        if isinstance(method, str):
            method = get_method(method, data.n, **dict(params or {}))
        indices = method.inputs()
        try:
            method.prepare(lambda: data.stream(indices, chunk_elements))
        except NonFiniteInput as exc:
            raise NonFiniteInput(exc.index, exc.key, str(inputs[exc.index])) from None
        out_specs = {key: TensorSpec("F32", spec.shape) for key, spec in data.specs.items()}
        total = sum(spec.nbytes for spec in out_specs.values())
        kept = _KeptCounter(out_specs)
        metadata = {
            "format": OUTPUT_FORMAT,
            "method": method.name,
            "params": json.dumps(method.params.model_dump(), sort_keys=True),
            "n": str(data.n),
        }
        to_hash = (
            [] if known else [Path(p) for p in [*inputs, *([pretrained] if pretrained else [])]]
        )
        hashes = _Hashes(to_hash, merge_threads())
        try:
            writer_type = SafetensorsWriter if layout == "dense" else SparseWriter
            with writer_type(output, out_specs, metadata, reserve=256 + 96 * data.n) as writer:
                done = 0
                for key, merged, kept_here in data.merged(method, indices, chunk_elements):
                    kept.add(key, kept_here)
                    writer.write(key, merged)
                    done += merged.nbytes
                    if on_progress is not None:
                        on_progress(done, total)
                computed = hashes.result()
                input_hashes = list(input_sha256) if known else computed[: data.n]
                base_hash = None
                if pretrained is not None:
                    base_hash = pretrained_sha256 if known else computed[data.n]
                writer.metadata.update(
                    input_sha256=json.dumps(input_hashes),
                    kept_fraction=f"{kept.overall():.6f}",
                    **({"pretrained_sha256": base_hash} if base_hash else {}),
                )
        except NonFiniteInput as exc:  # name the file, not its position
            raise NonFiniteInput(exc.index, exc.key, str(inputs[exc.index])) from None
        finally:
            hashes.close()
    written = "dense" if layout == "dense" else "sparse"
    if layout == "auto" and os.path.getsize(output) > total:
        replace_with_dense(output)
        written = "dense"
    return MergeResult(
        method=method.name,
        params=method.params.model_dump(),
        n=data.n,
        kept_fraction=kept.overall(),
        kept_per_tensor=kept.per_tensor(),
        input_sha256=input_hashes,
        pretrained_sha256=base_hash,
        output=str(Path(output)),
        seconds=time.perf_counter() - began,
        layout=written,
        output_bytes=os.path.getsize(output),
        dense_bytes=total,
    )


def replace_with_dense(path: str | os.PathLike) -> None:
    """Rewrite a sparse file dense in place (atomically: the sparse file stays until the
    dense one is complete)."""
    path = Path(path)
    dense = path.with_name(f".{path.name}.dense")
    convert(path, dense, sparse=False)
    os.replace(dense, path)


def merge_task_vectors(
    method: str | MergeMethod,
    vectors: Sequence[Mapping[str, Any]],
    params: Mapping[str, object] | None = None,
) -> MergeResult:
    """Merge task vectors held in memory (dicts of torch tensors, or of numpy arrays); the
    result's `tensors` are fp32, torch tensors if torch tensors came in.

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
        kept.add(chunk.key, kept_count(values))
        merged[chunk.key] = values.reshape(specs[chunk.key].shape)
    return MergeResult(
        method=method.name,
        params=method.params.model_dump(),
        n=len(vectors),
        kept_fraction=kept.overall(),
        kept_per_tensor=kept.per_tensor(),
        seconds=time.perf_counter() - began,
        tensors=like_inputs(merged, vectors),
    )


def like_inputs(arrays: dict[str, np.ndarray], vectors: Sequence[Mapping[str, Any]]) -> dict:
    """`arrays` as torch tensors (sharing memory) if the task vectors were torch tensors."""
    first = next(iter(vectors[0].values()), None)
    if first is None or isinstance(first, np.ndarray):
        return arrays
    import torch

    return {key: torch.from_numpy(value) for key, value in arrays.items()}


def common_specs(vectors: Sequence[Mapping[str, Any]]) -> dict[str, TensorSpec]:
    reference = vectors[0]
    for k, vector in enumerate(vectors[1:], start=2):
        for key, tensor in reference.items():
            other = vector.get(key)
            if other is None or tuple(other.shape) != tuple(tensor.shape):
                found = "missing" if other is None else f"shaped {list(other.shape)}"
                raise MergeError(f"task vector {k}: key {key!r} is {found}")
        extra = [key for key in vector if key not in reference]
        if extra:
            raise MergeError(f"task vector {k}: key {extra[0]!r} is not in task vector 1")
    return {key: TensorSpec("F32", tuple(t.shape)) for key, t in reference.items() if _is_float(t)}


def iter_memory_chunks(
    vectors: Sequence[Mapping[str, Any]],
    specs: Mapping[str, TensorSpec],
    indices: Sequence[int],
) -> Iterator[Chunk]:
    for key, spec in specs.items():
        values = [_float32(vectors[i][key]) for i in indices]
        yield Chunk(key, 0, spec.numel, indices, values)


def _is_float(value: Any) -> bool:
    if isinstance(value, np.ndarray):
        return np.issubdtype(value.dtype, np.floating)
    return value.is_floating_point()


def _float32(value: Any) -> np.ndarray:
    """A task vector's tensor as flat float32 numpy (no copy if it is a CPU fp32 tensor)."""
    if isinstance(value, np.ndarray):
        return np.ascontiguousarray(value, dtype=np.float32).reshape(-1)
    return value.detach().reshape(-1).float().cpu().numpy()
