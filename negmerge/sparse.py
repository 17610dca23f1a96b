"""Sparse checkpoint files: per tensor a bitmask of the elements kept and their values.

NegMerge keeps 5-10% of a task vector's elements; the rest are zero. A sparse file is a plain
safetensors file (any safetensors reader opens it) that stores, for every tensor `key`,

  mask/<key>    U8[ceil(numel / 64) * 8]   bit i (little-endian within a byte) set if element i
                                           is kept; padded to 8 bytes so values stay aligned
  values/<key>  <dtype>[kept]              the kept elements, in order, in the tensor's dtype

with all masks first and all values after them. The metadata is the dense file's, plus
`layout` (SPARSE_LAYOUT) and `layout_tensors` (every tensor's key, dtype and shape, in order).
An element is kept when its bit pattern is not all zeros, so -0.0, NaN and integer tensors
round-trip bit-exactly, and the zeros dropped are exactly +0.0 (zero bytes).

A bitmask rather than indices: at kept fraction p a tensor costs numel * (1/8 + p * itemsize)
bytes against numel * p * (4 + itemsize) for int32 indices, smaller whenever p > 1/32, and the
mask's size is known before the values are, so masks and values are written in one pass.

`SparseFile` reads one like a dense checkpoint: `read_array` of a slice rebuilds only that
slice, so `negmerge apply` and the merge engine stream it unchanged. `SparseTensors` holds a
sparse file in memory and densifies one tensor per lookup.
"""

from __future__ import annotations

import json
import os
import struct
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from negmerge.errors import CheckpointError
from negmerge.io import (
    Checkpoint,
    SafetensorsFile,
    SafetensorsWriter,
    TensorSpec,
    declared_bytes,
    open_checkpoint,
    refuse_overwriting,
    torch_dtype,
)

if TYPE_CHECKING:
    import torch

SPARSE_LAYOUT = "negmerge.sparse-bitmask/1"
# Prefix counts of kept elements are kept per block of this many elements (an 8 KiB mask), so
# a slice anywhere in a tensor is found by reading at most one block of mask before it.
BLOCK_ELEMENTS = 1 << 16
_COPY_ELEMENTS = 1 << 20
_UNSIGNED = {1: np.dtype("u1"), 2: np.dtype("<u2"), 4: np.dtype("<u4"), 8: np.dtype("<u8")}


def mask_nbytes(numel: int) -> int:
    """Bytes of a tensor's mask: one bit per element, padded to a multiple of 8 bytes."""
    return -(-numel // 64) * 8


def is_sparse(metadata: Mapping[str, str]) -> bool:
    """Whether a safetensors file's metadata marks it as a sparse file."""
    return metadata.get("layout") == SPARSE_LAYOUT


def stored_names(key: str) -> tuple[str, str]:
    """The names of a tensor's mask and values in a sparse file."""
    return f"mask/{key}", f"values/{key}"


def kept_mask(raw: np.ndarray) -> np.ndarray:
    """True where an element's bits are not all zero (so +0.0 alone is dropped)."""
    return raw.view(_UNSIGNED[raw.dtype.itemsize]) != 0


class SparseWriter:
    """Writes a sparse file tensor slice by tensor slice, atomically, with the interface of
    `SafetensorsWriter` (write in the order of `specs`; `metadata` may change until close).

    Masks have known sizes, so they get their place up front and values are appended after
    all of them; the header, with the value counts, is written last into room reserved for
    its longest possible form.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        specs: Mapping[str, TensorSpec],
        metadata: Mapping[str, str] | None = None,
        reserve: int = 4096,
    ) -> None:
        self.path = Path(path)
        self._specs = dict(specs)
        names = [name for key in self._specs for name in stored_names(key)]
        if len(set(names)) != len(names):
            raise CheckpointError(f"{self.path}: tensor names collide in the sparse layout")
        layout = [[key, spec.dtype, list(spec.shape)] for key, spec in self._specs.items()]
        self.metadata = {**(metadata or {}), "layout": SPARSE_LAYOUT}
        self.metadata["layout_tensors"] = json.dumps(layout, separators=(",", ":"))
        self._mask_at, offset = {}, 0
        for key, spec in self._specs.items():
            self._mask_at[key] = offset
            offset += mask_nbytes(spec.numel)
        self._masks_end = offset
        self._kept = dict.fromkeys(self._specs, 0)
        self._done = dict.fromkeys(self._specs, 0)
        self._order = list(self._specs)
        self._current = 0
        self._carry = np.empty(0, bool)  # mask bits of the current tensor not yet packed
        self._mask_written = 0
        self._values_end = self._masks_end
        # The header with every count and offset at its largest has the most digits it can.
        largest = self._masks_end + sum(spec.nbytes for spec in self._specs.values())
        worst = self._header({key: spec.numel for key, spec in self._specs.items()}, largest)
        self._capacity = -(-(len(worst) + reserve) // 8) * 8
        self._tmp = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex[:8]}.tmp")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self._tmp, "wb")  # noqa: SIM115 (closed by close/abort)
        self._fd = self._file.fileno()

    def _header(self, kept: Mapping[str, int], fixed_offset: int | None = None) -> bytes:
        """The header JSON for `kept` values per tensor (every offset `fixed_offset` if given:
        to size the header's room before the offsets are known)."""
        entries: dict[str, object] = {"__metadata__": self.metadata}
        values_at = self._masks_end
        for key, spec in self._specs.items():
            mask_name, values_name = stored_names(key)
            size = mask_nbytes(spec.numel)
            begin = self._mask_at[key]
            entries[mask_name] = {
                "dtype": "U8",
                "shape": [size],
                "data_offsets": [fixed_offset or begin, fixed_offset or begin + size],
            }
            nbytes = kept[key] * spec.itemsize
            entries[values_name] = {
                "dtype": spec.dtype,
                "shape": [kept[key]],
                "data_offsets": [fixed_offset or values_at, fixed_offset or values_at + nbytes],
            }
            values_at += nbytes
        return json.dumps(entries, separators=(",", ":")).encode()

    def _pwrite(self, data: Any, offset: int) -> None:
        view = memoryview(data).cast("B")
        position = 8 + self._capacity + offset
        while view:
            written = os.pwrite(self._fd, view, position)
            view, position = view[written:], position + written

    def write(self, key: str, data: Any) -> None:
        """Append the next slice of tensor `key` (tensors in order, each slice after the last).

        `data`: a torch tensor in the declared dtype, or a numpy array in its storage dtype.
        """
        spec = self._specs.get(key)
        raw = declared_bytes(key, data, spec)
        elements = np.frombuffer(raw, spec.storage)
        if not len(elements):
            return
        while self._order[self._current] != key and self._complete(self._order[self._current]):
            self._current += 1
            if self._current == len(self._order):
                raise ValueError(f"{key}: every declared tensor is already written")
        if key != self._order[self._current]:
            raise ValueError(f"{key}: written out of order, expected {self._order[self._current]}")
        if self._done[key] + len(elements) > spec.numel:
            raise ValueError(f"{key}: more than its {spec.numel} elements written")
        keep = kept_mask(elements)
        self._done[key] += len(elements)
        bits = np.concatenate([self._carry, keep]) if len(self._carry) else keep
        last = self._complete(key)
        whole = len(bits) if last else len(bits) // 8 * 8
        packed = np.packbits(bits[:whole], bitorder="little")
        self._carry = bits[whole:].copy()
        if last:  # the padding after the last bit is zeros
            packed = np.concatenate(
                [packed, np.zeros(mask_nbytes(spec.numel) - self._mask_written - len(packed), "u1")]
            )
        self._pwrite(packed, self._mask_at[key] + self._mask_written)
        self._mask_written = 0 if last else self._mask_written + len(packed)
        values = np.ascontiguousarray(elements[keep])
        self._pwrite(values, self._values_end)
        self._values_end += values.nbytes
        self._kept[key] += len(values)

    def _complete(self, key: str) -> bool:
        return self._done[key] == self._specs[key].numel

    def close(self) -> None:
        missing = [key for key in self._order if not self._complete(key)]
        if missing:
            self.abort()
            raise ValueError(f"{self.path}: closed with tensor {missing[0]!r} unfinished")
        header = self._header(self._kept)
        if len(header) > self._capacity:
            self.abort()
            raise CheckpointError(f"{self.path}: metadata outgrew the room reserved for it")
        os.pwrite(self._fd, struct.pack("<Q", self._capacity) + header.ljust(self._capacity), 0)
        os.ftruncate(self._fd, 8 + self._capacity + self._values_end)
        os.fsync(self._fd)
        self._file.close()
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        self._file.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> SparseWriter:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class SparseFile(Checkpoint):
    """A sparse file read as the dense checkpoint it stands for: `specs` are the dense
    tensors', and a slice read rebuilds just that slice (zeros where nothing was kept)."""

    def __init__(self, stored: SafetensorsFile) -> None:
        self.path = stored.path
        self.stored = stored
        metadata = dict(stored.metadata)
        try:
            layout = json.loads(metadata.pop("layout_tensors"))
            self.specs = {str(key): TensorSpec(dtype, shape) for key, dtype, shape in layout}
        except (KeyError, TypeError, ValueError, CheckpointError):
            raise CheckpointError(f"{self.path}: sparse file with an invalid tensor list") from None
        self.metadata = metadata
        for key, spec in self.specs.items():
            mask_name, values_name = stored_names(key)
            mask, values = stored.specs.get(mask_name), stored.specs.get(values_name)
            if mask != TensorSpec("U8", (mask_nbytes(spec.numel),)) or (
                values is None
                or values.dtype != spec.dtype
                or len(values.shape) != 1
                or values.numel > spec.numel
            ):
                raise CheckpointError(f"{self.path}: tensor {key!r} has an invalid sparse entry")
        self._prefix: dict[str, np.ndarray] = {}

    def kept(self, key: str) -> int:
        """Elements of `key` stored (all but the +0.0 ones)."""
        return self.stored.specs[stored_names(key)[1]].numel

    def _block_prefix(self, key: str) -> np.ndarray:
        """Kept elements before each block of BLOCK_ELEMENTS, checked against the values."""
        if key not in self._prefix:
            mask_name = stored_names(key)[0]
            size = self.stored.specs[mask_name].numel
            block_bytes = BLOCK_ELEMENTS // 8
            counts = []
            for lo in range(0, size, 128 * block_bytes):  # 1 MiB of mask at a time
                mask = self.stored.read_array(mask_name, lo, min(lo + 128 * block_bytes, size))
                per_byte = np.bitwise_count(mask)
                whole = len(per_byte) // block_bytes * block_bytes
                counts.append(per_byte[:whole].reshape(-1, block_bytes).sum(axis=1, dtype=np.int64))
                if whole < len(per_byte):  # the tensor's last, partial block
                    counts.append(per_byte[whole:].sum(dtype=np.int64, keepdims=True))
            per_block = np.concatenate(counts) if counts else np.zeros(0, np.int64)
            prefix = np.concatenate([np.zeros(1, np.int64), np.cumsum(per_block)])
            if prefix[-1] != self.kept(key):
                raise CheckpointError(f"{self.path}: tensor {key!r}: mask and values disagree")
            self._prefix[key] = prefix
        return self._prefix[key]

    def read_array(
        self, key: str, start: int = 0, stop: int | None = None, buffer: np.ndarray | None = None
    ) -> np.ndarray:
        spec, start, stop = self._slice_bounds(key, start, stop)
        nbytes = (stop - start) * spec.itemsize
        out = np.zeros(nbytes, np.uint8) if buffer is None else buffer[:nbytes]
        if buffer is not None:
            out[:] = 0
        dense = out.view(spec.storage)
        if stop == start:
            return dense
        keep, values = self.read_kept(key, start, stop)
        dense[keep] = values
        return dense

    def read_kept(self, key: str, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Elements [start, stop) of `key` as stored: which are kept (bools) and their values."""
        _, start, stop = self._slice_bounds(key, start, stop)
        mask_name, values_name = stored_names(key)
        block = start // BLOCK_ELEMENTS
        base = block * BLOCK_ELEMENTS  # read the mask from the block's start: its count is known
        mask = self.stored.read_array(mask_name, base // 8, -(-stop // 8))
        bits = np.unpackbits(mask, bitorder="little").view(bool)
        first = int(self._block_prefix(key)[block]) + int(np.count_nonzero(bits[: start - base]))
        keep = bits[start - base : stop - base]
        values = self.stored.read_array(values_name, first, first + int(np.count_nonzero(keep)))
        return keep, values

    def sha256(self) -> str:
        return self.stored.sha256()

    def close(self) -> None:
        self.stored.close()


class SparseTensors(Mapping):
    """A sparse file's tensors held sparse in memory; each lookup densifies one tensor (a new
    torch tensor in its dtype and shape), so a caller that takes them one at a time never
    holds more than one dense."""

    def __init__(self, path: str | os.PathLike) -> None:
        with open_checkpoint(path) as ckpt:
            if not isinstance(ckpt, SparseFile):
                raise CheckpointError(f"{path}: not a sparse file")
            self.specs = dict(ckpt.specs)
            self.metadata = dict(ckpt.metadata)
            self._stored: dict[str, tuple[np.ndarray, np.ndarray]] = {}
            for key in self.specs:
                mask_name, values_name = stored_names(key)
                ckpt._block_prefix(key)  # checks the mask against the values
                self._stored[key] = (
                    ckpt.stored.read_array(mask_name),
                    ckpt.stored.read_array(values_name),
                )

    def __getitem__(self, key: str) -> torch.Tensor:
        import torch

        spec = self.specs[key]
        mask, values = self._stored[key]
        dense = np.zeros(spec.numel, spec.storage)
        dense[np.unpackbits(mask, count=spec.numel, bitorder="little").view(bool)] = values
        return torch.from_numpy(dense).view(torch_dtype(spec.dtype)).reshape(spec.shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self.specs)

    def __len__(self) -> int:
        return len(self.specs)

    @property
    def nbytes(self) -> int:
        """Memory held: masks and kept values."""
        return sum(mask.nbytes + values.nbytes for mask, values in self._stored.values())


def convert(
    source: str | os.PathLike, output: str | os.PathLike, sparse: bool = True
) -> dict[str, str]:
    """Rewrite a checkpoint file sparse (or dense), streaming slice by slice; same tensors,
    same metadata. Returns the output's metadata."""
    refuse_overwriting(output, [source])
    with open_checkpoint(source) as ckpt:
        writer_type = SparseWriter if sparse else SafetensorsWriter
        metadata = {k: v for k, v in ckpt.metadata.items() if k != "layout"}
        with writer_type(output, ckpt.specs, metadata) as writer:
            for key, spec in ckpt.specs.items():
                for start in range(0, spec.numel, _COPY_ELEMENTS):
                    stop = min(start + _COPY_ELEMENTS, spec.numel)
                    writer.write(key, ckpt.read_array(key, start, stop))
        return writer.metadata
