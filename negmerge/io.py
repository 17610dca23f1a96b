"""Checkpoint files, read and written one slice of one tensor at a time.

safetensors is the streaming format. We parse its header ourselves and read byte ranges with
pread rather than mmap: pages touched through a mmap count towards the process's resident
memory, which would make a merge's peak memory grow with the number of inputs. PyTorch
state-dict files are accepted too, but only through torch.load(weights_only=True): a user's
file is never unpickled.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import struct
import uuid
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from negmerge.errors import CheckpointError

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
_MAX_HEADER_BYTES = 100 * 1024 * 1024
_HASH_BLOCK = 8 * 1024 * 1024


@dataclass(frozen=True)
class TensorSpec:
    """What a checkpoint declares about one tensor, before any of its data is read."""

    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    @property
    def is_float(self) -> bool:
        return self.dtype.is_floating_point

    def describe(self) -> str:
        return f"{str(self.dtype).removeprefix('torch.')}{list(self.shape)}"


class Checkpoint:
    """A named collection of tensors on disk that can be read slice by slice."""

    path: Path
    specs: dict[str, TensorSpec]  # in storage order
    metadata: dict[str, str]

    def read(
        self, key: str, start: int = 0, stop: int | None = None, buffer: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Elements [start, stop) of tensor `key`, flattened, in its stored dtype.

        With `buffer` (a uint8 tensor at least as large as the slice) no memory is allocated;
        the result is then a view of the buffer, valid until the buffer is reused.
        """
        raise NotImplementedError

    def tensor(self, key: str) -> torch.Tensor:
        """The whole tensor `key` in its shape."""
        return self.read(key).reshape(self.specs[key].shape)

    def sha256(self) -> str:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _slice_bounds(self, key: str, start: int, stop: int | None) -> tuple[TensorSpec, int, int]:
        spec = self.specs[key]
        stop = spec.numel if stop is None else stop
        if not 0 <= start <= stop <= spec.numel:
            raise IndexError(f"{key}: slice [{start}, {stop}) outside {spec.numel} elements")
        return spec, start, stop


class _SequentialSha256:
    """sha256 of a file, fed by the reads the caller makes anyway.

    Reads mostly arrive in file order. Bytes a read skips over are read here to fill the gap,
    and a read behind the hashed prefix needs nothing, so each byte is hashed once, in order,
    and a file read front to back is never read twice.
    """

    def __init__(self, fd: int, size: int) -> None:
        self._fd, self._size = fd, size
        self._hash = hashlib.sha256()
        self._done = 0

    def feed(self, offset: int, data: memoryview) -> None:
        if offset > self._done:
            self._fill(offset)
        end = offset + len(data)
        if offset <= self._done < end:
            self._hash.update(data[self._done - offset :])
            self._done = end

    def hexdigest(self) -> str:
        self._fill(self._size)
        return self._hash.hexdigest()

    def _fill(self, until: int) -> None:
        while self._done < until:
            block = os.pread(self._fd, min(_HASH_BLOCK, until - self._done), self._done)
            if not block:
                raise CheckpointError(f"file shrank while being read (at byte {self._done})")
            self._hash.update(block)
            self._done += len(block)


class SafetensorsFile(Checkpoint):
    """A safetensors file read with positional reads, hashing its bytes as they go by (unless
    `hashing` is off, for callers that know the hash already)."""

    def __init__(self, path: Path, hashing: bool = True) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(self._fd).st_size
            self._hasher = _SequentialSha256(self._fd, size) if hashing else None
            header = self._parse_header(size)
        except BaseException:
            os.close(self._fd)
            raise
        self.metadata = header.pop("__metadata__", None) or {}
        entries = sorted(header.items(), key=lambda item: item[1]["data_offsets"][0])
        self.specs, self._offsets = {}, {}
        for key, entry in entries:
            spec = self._parse_entry(key, entry, size)
            self.specs[key] = spec
            self._offsets[key] = self._data_start + entry["data_offsets"][0]

    def _parse_header(self, size: int) -> dict:
        prefix = os.pread(self._fd, 8, 0)
        if len(prefix) < 8:
            raise CheckpointError(f"{self.path}: not a safetensors or PyTorch file (too short)")
        (length,) = struct.unpack("<Q", prefix)
        if length > min(_MAX_HEADER_BYTES, size - 8):
            raise CheckpointError(f"{self.path}: not a safetensors or PyTorch state-dict file")
        raw = os.pread(self._fd, length, 8)
        if self._hasher is not None:
            self._hasher.feed(0, memoryview(prefix + raw))
        try:
            header = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise CheckpointError(
                f"{self.path}: not a safetensors or PyTorch state-dict file"
            ) from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: safetensors header is not a JSON object")
        self._data_start = 8 + length
        return header

    def _parse_entry(self, key: str, entry: object, size: int) -> TensorSpec:
        try:
            dtype = SAFETENSORS_DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(
                f"{self.path}: tensor {key!r} has an invalid header entry"
            ) from None
        spec = TensorSpec(dtype, shape)
        if end - begin != spec.nbytes or self._data_start + end > size:
            raise CheckpointError(f"{self.path}: tensor {key!r} has inconsistent data offsets")
        return spec

    def read(
        self, key: str, start: int = 0, stop: int | None = None, buffer: torch.Tensor | None = None
    ) -> torch.Tensor:
        spec, start, stop = self._slice_bounds(key, start, stop)
        itemsize = spec.dtype.itemsize
        nbytes = (stop - start) * itemsize
        out = torch.empty(nbytes, dtype=torch.uint8) if buffer is None else buffer[:nbytes]
        if nbytes:
            offset = self._offsets[key] + start * itemsize
            view = memoryview(out.numpy())
            done = 0
            while done < nbytes:
                got = os.preadv(self._fd, [view[done:]], offset + done)
                if got == 0:
                    raise CheckpointError(f"{self.path}: truncated inside tensor {key!r}")
                done += got
            if self._hasher is not None:
                self._hasher.feed(offset, view)
        return out.view(spec.dtype)

    def sha256(self) -> str:
        return file_sha256(self.path) if self._hasher is None else self._hasher.hexdigest()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class StateDictFile(Checkpoint):
    """A PyTorch state-dict file, loaded with weights_only=True (no arbitrary unpickling)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.metadata = {}
        try:
            obj = torch.load(
                path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path)
            )
        except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError):
            raise CheckpointError(
                f"{path}: refused to load: it holds pickled Python objects, not just tensors "
                f"(a whole nn.Module?). Save model.state_dict() or use safetensors."
            ) from None
        if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
            obj = obj["state_dict"]
        if not isinstance(obj, Mapping):
            raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict")
        self._tensors: dict[str, torch.Tensor] = {}
        for key, value in obj.items():
            if not isinstance(value, torch.Tensor):
                raise CheckpointError(f"{path}: entry {key!r} is a {type(value).__name__}")
            self._tensors[str(key)] = value
        self.specs = {k: TensorSpec(t.dtype, tuple(t.shape)) for k, t in self._tensors.items()}

    def read(
        self, key: str, start: int = 0, stop: int | None = None, buffer: torch.Tensor | None = None
    ) -> torch.Tensor:
        _, start, stop = self._slice_bounds(key, start, stop)
        return self._tensors[key].reshape(-1)[start:stop]

    def sha256(self) -> str:
        return file_sha256(self.path)


def open_checkpoint(path: str | os.PathLike, hashing: bool = True) -> Checkpoint:
    """Open a safetensors or PyTorch state-dict file, telling the two apart by content.

    With `hashing`, a safetensors file computes its sha256 from the reads made anyway.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    with open(path, "rb") as f:
        head = f.read(2)
    if head == b"PK" or head[:1] == b"\x80":  # torch.save's zip format, or a legacy pickle
        return StateDictFile(path)
    return SafetensorsFile(path, hashing)


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint file, in its shape and dtype."""
    with open_checkpoint(path) as ckpt:
        return {key: ckpt.tensor(key).clone() for key in ckpt.specs}


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


class SafetensorsWriter:
    """Writes a safetensors file tensor by tensor, in the order of `specs`, atomically.

    The header comes first, so every shape is declared up front; room is reserved in the
    header's whitespace padding so that metadata known only at the end (input hashes, the kept
    fraction) can still be set before `close`. The file appears under its name only once
    complete; on an error nothing is left behind.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        specs: Mapping[str, TensorSpec],
        metadata: Mapping[str, str] | None = None,
        reserve: int = 4096,
    ) -> None:
        self.path = Path(path)
        self.metadata = dict(metadata or {})
        self._specs = dict(specs)
        self._entries, offset = {}, 0
        for key, spec in self._specs.items():
            name = _DTYPE_NAMES.get(spec.dtype)
            if name is None:
                raise CheckpointError(f"{key}: dtype {spec.dtype} cannot be stored in safetensors")
            self._entries[key] = {
                "dtype": name,
                "shape": list(spec.shape),
                "data_offsets": [offset, offset + spec.nbytes],
            }
            offset += spec.nbytes
        self._total = offset
        self._capacity = _round_up(len(self._header()) + reserve, 8)
        self._tmp = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex[:8]}.tmp")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self._tmp, "wb")  # noqa: SIM115 (closed by close/abort)
        self._write_header()
        self._order = [k for k, s in self._specs.items() if s.nbytes]
        self._current, self._left, self._written = -1, 0, 0

    def _header(self) -> bytes:
        header = (
            {"__metadata__": self.metadata, **self._entries} if self.metadata else self._entries
        )
        return json.dumps(header, separators=(",", ":")).encode()

    def _write_header(self) -> None:
        header = self._header()
        if len(header) > self._capacity:
            raise CheckpointError(f"{self.path}: metadata outgrew the room reserved for it")
        self._file.seek(0)
        self._file.write(struct.pack("<Q", self._capacity) + header.ljust(self._capacity))

    def write(self, key: str, data: torch.Tensor) -> None:
        """Append the next slice of tensor `key` (tensors in order, each slice after the last)."""
        spec = self._specs.get(key)
        if spec is None or data.dtype != spec.dtype:
            raise ValueError(f"{key}: not declared with dtype {data.dtype}")
        raw = data.detach().contiguous().reshape(-1).view(torch.uint8)
        if not len(raw):
            return
        if self._left == 0:
            self._current += 1
            if self._current >= len(self._order):
                raise ValueError(f"{key}: every declared tensor is already written")
            self._left = self._specs[self._order[self._current]].nbytes
        if key != self._order[self._current]:
            raise ValueError(f"{key}: written out of order, expected {self._order[self._current]}")
        if len(raw) > self._left:
            raise ValueError(f"{key}: {len(raw)} bytes written where {self._left} remain")
        self._file.write(raw.numpy().data)
        self._left -= len(raw)
        self._written += len(raw)

    def close(self) -> None:
        if self._written != self._total:
            self.abort()
            raise ValueError(
                f"{self.path}: closed with {self._total - self._written} bytes unwritten"
            )
        self._write_header()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        self._file.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def save_file(
    tensors: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write `tensors` to a safetensors file atomically."""
    specs = {key: TensorSpec(t.dtype, tuple(t.shape)) for key, t in tensors.items()}
    with SafetensorsWriter(path, specs, metadata, reserve=0) as writer:
        for key, tensor in tensors.items():
            writer.write(key, tensor)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple
