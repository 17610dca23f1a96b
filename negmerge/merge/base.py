"""What a merge method is, and the registry that finds one by name.

A method is a small reducer over task vectors that arrive one at a time, element-wise:
`start` takes the first, `add` folds in each next one, `finish` turns the state into the
merged values. The streaming engine runs it over slices of tensors, so no method ever holds
more than one task vector's slice at once. Methods whose states combine associatively
(`combine`) can be merged in shards on different machines.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from typing import ClassVar, NamedTuple

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from negmerge.errors import MergeError

State = dict[str, torch.Tensor]


class Chunk(NamedTuple):
    """A slice [start, stop) of tensor `key`, flattened, for each task vector a method reads.

    `taus` are fp32 views of reused buffers: valid until the next chunk is produced.
    """

    key: str
    start: int
    stop: int
    indices: Sequence[int]
    taus: Sequence[torch.Tensor]


class NoParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MergeMethod(ABC):
    """One merge method with its validated parameters, for a merge of `n` task vectors."""

    name: ClassVar[str]
    summary: ClassVar[str]
    Params: ClassVar[type[BaseModel]] = NoParams
    associative: ClassVar[bool] = False

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
    def start(self, tau: torch.Tensor, index: int) -> State:
        """The state after the first task vector. Must not keep `tau` itself (it is reused)."""

    @abstractmethod
    def add(self, state: State, tau: torch.Tensor, index: int) -> None:
        """Fold the next task vector into `state`, in place."""

    @abstractmethod
    def finish(self, state: State, n: int) -> torch.Tensor:
        """The merged values from the state of `n` task vectors."""

    def combine(self, first: State, second: State) -> State:
        """The state of two disjoint shards, `first`'s task vectors before `second`'s."""
        raise MergeError(f"{self.name}: cannot be merged in shards")

    def describe(self) -> dict[str, object]:
        return {"method": self.name, "params": self.params.model_dump()}


METHODS: dict[str, type[MergeMethod]] = {}


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
