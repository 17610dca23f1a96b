"""Checkpoint files, read and written one slice of one tensor at a time.

safetensors is the streaming format. We parse its header ourselves and read either with pread
(into a caller's buffer) or through views of a read-only mmap, whose pages the merge engine
hands back (`release`) as soon as a slice is done: mapped pages count towards the process's
resident memory, so without that a merge's peak memory would grow with the number of inputs.
PyTorch state-dict files are accepted too, but only through torch.load(weights_only=True): a
user's file is never unpickled.

Data is handed out as numpy arrays in the stored dtype (bf16 and fp8 as their raw bits, since
numpy has no such types) so that merging needs no torch; `read`/`tensor` give torch tensors
for callers that use torch, importing it only then.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import mmap
import os
import pickle
import struct
import threading
import uuid
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from negmerge.errors import CheckpointError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class DType:
    """A safetensors dtype: its name in files, torch's name for it, and how numpy holds it."""

    name: str
    label: str  # torch's name (torch.<label>)
    itemsize: int
    is_float: bool
    storage: str  # numpy dtype of the raw elements (bf16 and fp8 have no numpy type)


DTYPES: dict[str, DType] = {
    d.name: d
    for d in [
        DType("F64", "float64", 8, True, "<f8"),
        DType("F32", "float32", 4, True, "<f4"),
        DType("F16", "float16", 2, True, "<f2"),
        DType("BF16", "bfloat16", 2, True, "<u2"),
        DType("F8_E4M3", "float8_e4m3fn", 1, True, "u1"),
        DType("F8_E5M2", "float8_e5m2", 1, True, "u1"),
        DType("I64", "int64", 8, False, "<i8"),
        DType("I32", "int32", 4, False, "<i4"),
        DType("I16", "int16", 2, False, "<i2"),
        DType("I8", "int8", 1, False, "i1"),
        DType("U8", "uint8", 1, False, "u1"),
        DType("BOOL", "bool", 1, False, "?"),
    ]
}
_BY_LABEL = {d.label: d.name for d in DTYPES.values()}
_BY_NUMPY = {"<f8": "F64", "<f4": "F32", "<f2": "F16", "<i8": "I64", "<i4": "I32"}
_BY_NUMPY |= {"<i2": "I16", "|i1": "I8", "|u1": "U8", "|b1": "BOOL"}
_MAX_HEADER_BYTES = 100 * 1024 * 1024
_HASH_BLOCK = 8 * 1024 * 1024
_PAGE = mmap.PAGESIZE
_FOLIO_REACH = 4 << 20
_SYNC_EVERY = 64 << 20


def dtype_name(dtype: object) -> str:
    """The safetensors name of a dtype given as that name, a torch dtype or a numpy dtype."""
    if isinstance(dtype, str) and dtype in DTYPES:
        return dtype
    if type(dtype).__module__ == "torch":  # torch.float32 -> "float32"
        name = _BY_LABEL.get(str(dtype).removeprefix("torch."))
    else:
        try:
            name = _BY_NUMPY.get(np.dtype(dtype).str)
        except TypeError:
            name = None
    if name is None:
        raise CheckpointError(f"dtype {dtype} cannot be stored in safetensors")
    return name


def torch_dtype(name: str) -> torch.dtype:
    import torch

    return getattr(torch, DTYPES[name].label)


@dataclass(frozen=True)
class TensorSpec:
    """What a checkpoint declares about one tensor, before any of its data is read.

    `dtype` is the safetensors name ("F32", "BF16", ...); a torch or numpy dtype given here is
    turned into that name, so specs compare equal however they were made.
    """

    dtype: str
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", dtype_name(self.dtype))
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype].itemsize

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize

    @property
    def is_float(self) -> bool:
        return DTYPES[self.dtype].is_float

    @property
    def storage(self) -> np.dtype:
        """The numpy dtype its raw elements are held in."""
        return np.dtype(DTYPES[self.dtype].storage)

    def describe(self) -> str:
        return f"{DTYPES[self.dtype].label}{list(self.shape)}"


class Checkpoint:
    """A named collection of tensors on disk that can be read slice by slice."""

    path: Path
    specs: dict[str, TensorSpec]  # in storage order
    metadata: dict[str, str]

    def read_array(
        self, key: str, start: int = 0, stop: int | None = None, buffer: np.ndarray | None = None
    ) -> np.ndarray:
        """Elements [start, stop) of tensor `key`, flattened, in its stored dtype, as a copy.

        With `buffer` (a uint8 array at least as large as the slice) no memory is allocated;
        the result is then a view of the buffer, valid until the buffer is reused.
        """
        raise NotImplementedError

    def view(self, key: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Elements [start, stop) of tensor `key`, flattened, read-only, copied only if need be.

        Where the file is mapped, the view's pages stay in this process's memory until
        `release` is called for the same range (and the view is no longer used).
        """
        return self.read_array(key, start, stop)

    def release(self, key: str, start: int = 0, stop: int | None = None) -> None:
        """Give back the memory behind a `view` of elements [start, stop) of `key` (and maybe a
        little before it: call it in file order, once views before the range are unused)."""

    def read(
        self, key: str, start: int = 0, stop: int | None = None, buffer: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`read_array` as a torch tensor in its torch dtype (`buffer`: a uint8 tensor)."""
        import torch

        raw = self.read_array(key, start, stop, None if buffer is None else buffer.numpy())
        return torch.from_numpy(raw).view(torch_dtype(self.specs[key].dtype))

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
    `hashing` is off, for callers that know the hash already or hash it themselves), or viewed
    through a read-only mmap (`view`, not hashed)."""

    def __init__(self, path: Path, hashing: bool = True) -> None:
        self.path = path
        self._map: mmap.mmap | None = None
        self._map_lock = threading.Lock()
        self._fd = os.open(path, os.O_RDONLY)
        try:
            self._size = os.fstat(self._fd).st_size
            self._hasher = _SequentialSha256(self._fd, self._size) if hashing else None
            header = self._parse_header(self._size)
        except BaseException:
            os.close(self._fd)
            raise
        self.metadata = header.pop("__metadata__", None) or {}
        entries = sorted(header.items(), key=lambda item: item[1]["data_offsets"][0])
        self.specs, self._offsets = {}, {}
        for key, entry in entries:
            spec = self._parse_entry(key, entry, self._size)
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
            dtype = DTYPES[entry["dtype"]].name
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

    def read_array(
        self, key: str, start: int = 0, stop: int | None = None, buffer: np.ndarray | None = None
    ) -> np.ndarray:
        spec, start, stop = self._slice_bounds(key, start, stop)
        nbytes = (stop - start) * spec.itemsize
        out = np.empty(nbytes, dtype=np.uint8) if buffer is None else buffer[:nbytes]
        if nbytes:
            offset = self._offsets[key] + start * spec.itemsize
            view = memoryview(out)
            done = 0
            while done < nbytes:
                got = os.preadv(self._fd, [view[done:]], offset + done)
                if got == 0:
                    raise CheckpointError(f"{self.path}: truncated inside tensor {key!r}")
                done += got
            if self._hasher is not None:
                self._hasher.feed(offset, view)
        return out.view(spec.storage)

    def view(self, key: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        # Safe to map: stored artifacts are replaced by renames, never rewritten in place (a
        # file truncated under a mapping would fault where pread reports an error).
        spec, start, stop = self._slice_bounds(key, start, stop)
        if self._map is None:
            with self._map_lock:  # merge threads ask for views at the same time
                if self._map is None:
                    self._map = mmap.mmap(self._fd, self._size, access=mmap.ACCESS_READ)
        offset = self._offsets[key] + start * spec.itemsize
        return np.frombuffer(self._map, spec.storage, stop - start, offset)

    def release(self, key: str, start: int = 0, stop: int | None = None) -> None:
        if self._map is None:
            return
        spec, start, stop = self._slice_bounds(key, start, stop)
        end = self._offsets[key] + stop * spec.itemsize
        # A touch maps a whole page-cache folio (2 MiB on ext4 here), which may reach back
        # into a range released before; releasing a few MiB behind the range catches those.
        begin = max(0, self._offsets[key] + start * spec.itemsize - _FOLIO_REACH)
        begin -= begin % _PAGE
        if end > begin:
            # The page cache keeps the data: this only unmaps it from this process.
            self._map.madvise(mmap.MADV_DONTNEED, begin, end - begin)

    def sha256(self) -> str:
        return file_sha256(self.path) if self._hasher is None else self._hasher.hexdigest()

    def close(self) -> None:
        if self._map is not None:
            # Views still alive keep the mapping; it closes with the last of them.
            with contextlib.suppress(BufferError):
                self._map.close()
            self._map = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class StateDictFile(Checkpoint):
    """A PyTorch state-dict file, loaded with weights_only=True (no arbitrary unpickling)."""

    def __init__(self, path: Path) -> None:
        import torch

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

    def read_array(
        self, key: str, start: int = 0, stop: int | None = None, buffer: np.ndarray | None = None
    ) -> np.ndarray:
        return self.view(key, start, stop).copy()

    def view(self, key: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        return tensor_to_numpy(self.read(key, start, stop))

    def sha256(self) -> str:
        return file_sha256(self.path)


def tensor_to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A CPU tensor's elements as numpy, sharing memory; bf16 and fp8 as their raw bits."""
    import torch

    name = dtype_name(tensor.dtype)
    tensor = tensor.detach()
    if name == "BF16":
        return tensor.view(torch.int16).numpy().view(np.uint16)
    if name.startswith("F8"):
        return tensor.view(torch.uint8).numpy()
    return tensor.numpy()


def refuse_overwriting(output: str | os.PathLike, inputs: Sequence[str | os.PathLike]) -> None:
    """Raise CheckpointError if `output` is one of `inputs`, by any path: writing the result
    would replace an input the user meant to keep."""
    for source in inputs:
        with contextlib.suppress(OSError):  # either missing: not the same file
            if os.path.samefile(output, source):
                raise CheckpointError(f"{output}: is also an input; write the result elsewhere")


def check_same_layout(reference: Checkpoint, other: Checkpoint) -> None:
    """Raise CheckpointError naming the first key whose presence, shape or dtype differs."""
    ref_name = reference.path.name
    for key, spec in reference.specs.items():
        theirs = other.specs.get(key)
        if theirs is None:
            raise CheckpointError(f"{other.path}: key {key!r} is missing (it is in {ref_name})")
        if theirs != spec:
            raise CheckpointError(
                f"{other.path}: key {key!r} is {theirs.describe()}, "
                f"but {spec.describe()} in {ref_name}"
            )
    for key in other.specs:
        if key not in reference.specs:
            raise CheckpointError(f"{other.path}: key {key!r} is not in {ref_name}")


def float_keys(specs: Mapping[str, TensorSpec]) -> list[str]:
    """The keys a task vector covers: the floating-point tensors."""
    return [key for key, spec in specs.items() if spec.is_float]


def to_float32(raw: np.ndarray, dtype: str, out: np.ndarray) -> np.ndarray:
    """Stored elements (as `Checkpoint.view` gives them) as float32, exactly as torch's
    `.float()` makes them: into `out` (same length), unless they are float32 already."""
    if dtype == "F32":
        return raw
    if dtype == "BF16":  # bf16 is the high half of an fp32: exact
        bits = out.view(np.uint32)
        np.copyto(bits, raw)
        np.left_shift(bits, 16, out=bits)
    elif dtype.startswith("F8"):
        np.take(_fp8_table(dtype), raw, out=out)
    elif dtype == "F16":  # widens exactly; * 1 quiets signalling NaNs, as torch's widening does
        np.multiply(raw, np.float32(1), out=out, dtype=np.float32)
    else:  # fp64 rounds to nearest, as torch does
        np.copyto(out, raw, casting="same_kind")
    return out


@functools.cache
def _fp8_table(dtype: str) -> np.ndarray:
    """The float32 value of each of the 256 fp8 bit patterns (NaNs with torch's bits)."""
    exponent_bits, bias = (4, 7) if dtype == "F8_E4M3" else (5, 15)
    mantissa_bits = 7 - exponent_bits
    table = np.empty(256, np.float32)
    bits_out = table.view(np.uint32)
    for bits in range(256):
        sign = -1.0 if bits & 0x80 else 1.0
        exponent = (bits >> mantissa_bits) & ((1 << exponent_bits) - 1)
        mantissa = bits & ((1 << mantissa_bits) - 1)
        nan = bits & 0x7F == 0x7F if dtype == "F8_E4M3" else exponent == 31 and mantissa
        if nan:  # sign and payload carried over, quiet bit set
            payload = mantissa << (23 - mantissa_bits) | 0x400000
            bits_out[bits] = (bits & 0x80) << 24 | 0x7F800000 | payload
        elif dtype == "F8_E5M2" and exponent == 31:
            table[bits] = sign * math.inf
        elif exponent == 0:
            table[bits] = sign * mantissa / (1 << mantissa_bits) * 2.0 ** (1 - bias)
        else:
            table[bits] = sign * (1 + mantissa / (1 << mantissa_bits)) * 2.0 ** (exponent - bias)
    return table


def open_checkpoint(path: str | os.PathLike, hashing: bool = True) -> Checkpoint:
    """Open a safetensors or PyTorch state-dict file, telling the two apart by content; a
    sparse file (negmerge.sparse) opens as the dense checkpoint it stands for.

    With `hashing`, a safetensors file computes its sha256 from the reads made anyway.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    with open(path, "rb") as f:
        head = f.read(9)
    # torch.save's zip format, or a legacy pickle (protocol 2+: 0x80); a safetensors file whose
    # header length's low byte is 0x80 starts the same, but its header (byte 8) opens a JSON {.
    if head[:2] == b"PK" or (head[:1] == b"\x80" and head[8:9] != b"{"):
        return StateDictFile(path)
    stored = SafetensorsFile(path, hashing)
    from negmerge import sparse  # it builds on this module

    if sparse.is_sparse(stored.metadata):
        try:
            return sparse.SparseFile(stored)
        except BaseException:
            stored.close()
            raise
    return stored


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint file, in its shape and dtype."""
    with open_checkpoint(path) as ckpt:
        return {key: ckpt.tensor(key).clone() for key in ckpt.specs}


def load_arrays(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of a checkpoint file as a numpy array in its shape (bf16, fp8: raw bits)."""
    with open_checkpoint(path) as ckpt:
        return {key: ckpt.read_array(key).reshape(spec.shape) for key, spec in ckpt.specs.items()}


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
            self._entries[key] = {
                "dtype": spec.dtype,
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
        self._synced, self._sync = 0, None

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

    def write(self, key: str, data: Any) -> None:
        """Append the next slice of tensor `key` (tensors in order, each slice after the last).

        `data`: a torch tensor in the declared dtype, or a numpy array in its storage dtype.
        """
        spec = self._specs.get(key)
        raw = declared_bytes(key, data, spec)
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
        self._file.write(raw)
        self._left -= len(raw)
        self._written += len(raw)
        if self._written - self._synced >= _SYNC_EVERY and not self._syncing():
            # Write back what is written so far while the caller computes the rest, so that
            # close()'s fsync has only the tail left to wait for.
            self._file.flush()
            self._synced = self._written
            self._sync = threading.Thread(target=os.fdatasync, args=(self._file.fileno(),))
            self._sync.start()

    def _syncing(self) -> bool:
        if self._sync is not None and not self._sync.is_alive():
            self._sync.join()
            self._sync = None
        return self._sync is not None

    def close(self) -> None:
        if self._written != self._total:
            self.abort()
            raise ValueError(
                f"{self.path}: closed with {self._total - self._written} bytes unwritten"
            )
        self._write_header()
        self._file.flush()
        self._wait_for_sync()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        self._wait_for_sync()
        self._file.close()
        self._tmp.unlink(missing_ok=True)

    def _wait_for_sync(self) -> None:
        if self._sync is not None:
            self._sync.join()
            self._sync = None

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def declared_bytes(key: str, data: Any, spec: TensorSpec | None) -> memoryview:
    """`data`'s bytes, for a writer of tensor `key` declared as `spec`; ValueError if `data`
    does not hold the declared dtype (or `key` was not declared)."""
    if isinstance(data, np.ndarray):
        matches = spec is not None and data.dtype == spec.storage
        array = data
    else:  # a torch tensor
        matches = spec is not None and dtype_name(data.dtype) == spec.dtype
        array = tensor_to_numpy(data.detach().cpu().contiguous()) if matches else None
    if not matches:
        raise ValueError(f"{key}: not declared with dtype {data.dtype}")
    return memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8))


def save_file(
    tensors: Mapping[str, Any],
    path: str | os.PathLike,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write `tensors` (torch tensors, or numpy arrays of safetensors dtypes) atomically."""
    specs = {key: TensorSpec(t.dtype, tuple(t.shape)) for key, t in tensors.items()}
    with SafetensorsWriter(path, specs, metadata, reserve=0) as writer:
        for key, tensor in tensors.items():
            writer.write(key, tensor)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple
