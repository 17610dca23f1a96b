"""What a merge method is, and the registry that finds one by name.

A method is a small reducer over task vectors that arrive one at a time, element-wise:
`start` takes the first, `add` folds in each next one, `finish` turns the state into the
merged values. The streaming engine runs it over slices of tensors, so no method ever holds
more than one task vector's slice at once. Methods whose states combine associatively
(`combine`) can be merged in shards on different machines.

Methods whose fold is also commutative (`commutative`: the state does not depend on the order
the task vectors came in) can keep a running state: each worker folds the variants it
finishes, in whatever order they finish (negmerge.merge.running). States are stored packed
(`pack`, `unpack`), as small as the method allows.

Methods work on float32 numpy arrays: the engine reads files without torch, and torch tensors
that callers hand in convert to numpy without a copy.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import ClassVar, NamedTuple

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from negmerge.errors import MergeError
from negmerge.io import to_float32

State = dict[str, np.ndarray]


class Chunk(NamedTuple):
    """Elements [start, stop) of tensor `key`, flattened, for each task vector a method reads.

    `values` are the selected inputs' elements as stored (read-only views, valid until the
    next chunk is produced); with a `base` (theta_pre's elements) they are fine-tuned weights
    and tau_k = values[k] - base, otherwise they are the task vectors themselves.
    """

    key: str
    start: int
    stop: int
    indices: Sequence[int]
    values: Sequence[np.ndarray]
    base: np.ndarray | None = None
    dtype: str = "F32"

    def taus(self, lo: int = 0, hi: int | None = None) -> Iterator[np.ndarray]:
        """Each task vector's float32 elements [lo, hi) of this chunk, in order. One scratch
        buffer is reused: each tau is valid only until the next one is produced."""
        hi = self.stop - self.start if hi is None else hi
        scratch = np.empty(hi - lo, np.float32)
        base = None
        if self.base is not None:
            base = to_float32(self.base[lo:hi], self.dtype, np.empty(hi - lo, np.float32))
        for value in self.values:
            tau = to_float32(value[lo:hi], self.dtype, scratch)
            if base is not None:
                tau = np.subtract(tau, base, out=scratch)
            yield tau


class NoParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MergeMethod(ABC):
    """One merge method with its validated parameters, for a merge of `n` task vectors."""

    name: ClassVar[str]
    summary: ClassVar[str]
    Params: ClassVar[type[BaseModel]] = NoParams
    associative: ClassVar[bool] = False
    commutative: ClassVar[bool] = False  # associative, and the order of the inputs is moot

    def __init__(self, n: int, **params: object) -> None:
        if n < 1:
            raise MergeError(f"{self.name}: needs at least one task vector, got {n}")
        self.n = n
        try:
            self.params = self.Params(**params)
        except ValidationError as exc:
            raise MergeError(f"{self.name}: {_describe(exc)}") from None

    def inputs(self) -> list[int]:
        """Indices of the task vectors this method reads."""
        return list(range(self.n))

    def prepare(self, stream: Callable[[], Iterable[Chunk]]) -> None:  # noqa: B027 (optional)
        """Gather whole-model statistics before merging; `stream()` makes one pass."""

    @abstractmethod
    def start(self, tau: np.ndarray, index: int) -> State:
        """The state after the first task vector. Must not keep or write to `tau` (it may be
        reused, or a read-only view of a file)."""

    @abstractmethod
    def add(self, state: State, tau: np.ndarray, index: int) -> None:
        """Fold the next task vector into `state`, in place (`tau` as for `start`)."""

    @abstractmethod
    def finish(self, state: State, n: int) -> np.ndarray:
        """The merged float32 values from the state of `n` task vectors (leaves `state` as it
        was: partial merges may finish and go on combining)."""

    def combine(self, first: State, second: State) -> State:
        """The state of two disjoint shards, `first`'s task vectors before `second`'s."""
        raise MergeError(f"{self.name}: cannot be merged in shards")

    def pack(self, state: State) -> State:
        """The state in its stored form (default: as it is)."""
        return state

    def unpack(self, packed: State, size: int) -> State:
        """The state from its stored form; `size`: its elements."""
        return packed

    def describe(self) -> dict[str, object]:
        return {"method": self.name, "params": self.params.model_dump()}


METHODS: dict[str, type[MergeMethod]] = {}


class NonFiniteInput(MergeError):
    """Task vector `index` (0-based) holds NaN or Inf in tensor `key`."""

    def __init__(self, index: int, key: str, where: str | None = None) -> None:
        self.index, self.key = index, key
        where = where or f"task vector {index + 1}"
        super().__init__(
            f"{where}: key {key!r} holds NaN or Inf (a diverged fine-tuning run?); "
            "refusing to merge it"
        )


def reduce_chunk(
    method: MergeMethod, taus: Iterable[np.ndarray], indices: Sequence[int], key: str = ""
) -> State:
    """Fold the task vectors' slices, in order, into the method's state. A slice with NaN or
    Inf is refused (NonFiniteInput): not every method would carry it into its result."""
    taus = _finite(taus, indices, key)
    with np.errstate(all="ignore"):  # inf and NaN are results here, as in torch, not warnings
        state = method.start(next(taus), indices[0])
        for tau, index in zip(taus, indices[1:], strict=True):
            method.add(state, tau, index)
    return state


def _finite(taus: Iterable[np.ndarray], indices: Sequence[int], key: str) -> Iterator[np.ndarray]:
    # tau . tau is finite exactly when tau is, unless its squares overflow: one BLAS pass,
    # about a quarter of NegMerge's own work per element; the exact test confirms a hit.
    for tau, index in zip(taus, indices, strict=True):
        if not np.isfinite(np.dot(tau, tau)) and not np.isfinite(tau).all():
            raise NonFiniteInput(index, key)
        yield tau


def register(cls: type[MergeMethod]) -> type[MergeMethod]:
    """Class decorator: make a method available by its name."""
    METHODS[cls.name] = cls
    return cls


def get_method(name: str, n: int, **params: object) -> MergeMethod:
    """Instantiate the method called `name` for `n` task vectors with its parameters."""
    cls = METHODS.get(name)
    if cls is None:
        raise MergeError(f"method: unknown {name!r}; choose one of {', '.join(sorted(METHODS))}")
    return cls(n, **params)


def _describe(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"]) or "params"
        message = (
            "not a parameter of this method" if error["type"] == "extra_forbidden" else error["msg"]
        )
        problems.append(f"{where}: {message}")
    return "; ".join(problems)
