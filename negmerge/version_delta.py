"""Model versions stored as their parent plus a sparse delta, materialised bit-exactly.

An unlearned model differs from its parent only where the merged task vector kept an element
(5-10% of them), so a version can be stored as a sparse file (negmerge.sparse's bitmask and
values) of the XOR of its elements' bit patterns with the parent's. XOR rather than a
difference: `parent XOR (child XOR parent)` is the child's bits exactly (a float difference
added back would round), and an element the job did not change has XOR zero, which the sparse
layout drops. The delta is computed from the two files' actual bytes, never from lambda * tau.

The delta file keeps the dense file's header bytes (`dense_header`, the JSON, and its padded
length `dense_header_bytes`), so materialising writes the dense file's exact bytes: that
header, then every tensor in data order, base XOR each delta of the chain. Its metadata also
names the parent's sha256 (`delta_parent_sha256`), the dense file's (`delta_sha256`) and the
chain's depth (`delta_depth`: 1 on a dense parent). Only a "canonical" dense file (tensors
back to back in header order, the header padded with spaces, as negmerge.io writes it) is
stored as a delta; any other is kept dense.

Materialising streams: one slice of one tensor of each file of the chain at a time.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np

from negmerge.errors import CheckpointError
from negmerge.io import TensorSpec, open_checkpoint
from negmerge.sparse import SparseFile, SparseWriter

DELTA_KIND = "negmerge.version-delta-xor/1"
_MAX_HEADER_BYTES = 100 * 1024 * 1024
_SLICE_ELEMENTS = 1 << 20
_UNSIGNED = {1: np.dtype("u1"), 2: np.dtype("<u2"), 4: np.dtype("<u4"), 8: np.dtype("<u8")}


class DenseReader:
    """A dense safetensors file read by ranges from any binary file object (a local file or
    an fsspec one on an object store), so it never needs to be whole on disk or in memory."""

    def __init__(self, file: BinaryIO, name: str = "weights") -> None:
        self.file, self.name = file, name
        prefix = file.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{name}: not a safetensors file (too short)")
        (length,) = struct.unpack("<Q", prefix)
        if length > _MAX_HEADER_BYTES:
            raise CheckpointError(f"{name}: not a safetensors file (header too long)")
        raw = file.read(length)
        self.header_bytes = prefix + raw
        try:
            header = json.loads(raw)
            self.metadata = header.pop("__metadata__", None) or {}
            entries = sorted(header.items(), key=lambda item: item[1]["data_offsets"][0])
            self.specs = {k: TensorSpec(e["dtype"], e["shape"]) for k, e in entries}
            self._offsets = {k: 8 + length + int(e["data_offsets"][0]) for k, e in entries}
            self._ends = {k: 8 + length + int(e["data_offsets"][1]) for k, e in entries}
        except (UnicodeDecodeError, ValueError, TypeError, KeyError, AttributeError):
            raise CheckpointError(f"{name}: not a safetensors file (invalid header)") from None

    def canonical(self, size: int) -> bool:
        """Tensors back to back from the header's end, nothing after, a space-padded header:
        the file is then fully described by its header JSON and its tensors' bytes."""
        at = len(self.header_bytes)
        for key, spec in self.specs.items():
            if self._offsets[key] != at or self._ends[key] - at != spec.nbytes:
                return False
            at += spec.nbytes
        return at == size and self.header_bytes[8:].rstrip(b" ").endswith(b"}")

    def read_bits(self, key: str, start: int, stop: int) -> np.ndarray:
        """Elements [start, stop) of `key` as unsigned integers of the dtype's width."""
        spec = self.specs[key]
        self.file.seek(self._offsets[key] + start * spec.itemsize)
        out = np.empty(stop - start, _UNSIGNED[spec.itemsize])
        view, done = memoryview(out).cast("B"), 0
        while done < len(view):
            got = self.file.readinto(view[done:])
            if not got:
                raise CheckpointError(f"{self.name}: truncated inside tensor {key!r}")
            done += got
        return out


def _xor_into(bits: np.ndarray, delta: SparseFile, key: str, start: int) -> None:
    """XOR a delta's elements [start, start + len(bits)) of `key` into `bits`, touching only
    the elements it changed."""
    keep, values = delta.read_kept(key, start, start + len(bits))
    bits[keep] ^= values.view(bits.dtype)


def write_delta(
    parent: str | os.PathLike,
    child: str | os.PathLike,
    output: str | os.PathLike,
    *,
    parent_sha256: str,
    child_sha256: str,
    depth: int,
    extra_metadata: dict[str, str] | None = None,
) -> bool:
    """Write `child` as a delta against `parent` (both local dense files) to `output`, if
    both are canonical with the same tensors; returns False (and writes nothing) otherwise."""
    with open(parent, "rb") as pf, open(child, "rb") as cf:
        base, new = DenseReader(pf, str(parent)), DenseReader(cf, str(child))
        if not new.canonical(os.fstat(cf.fileno()).st_size):
            return False
        if dict(base.specs) != dict(new.specs):
            return False
        header = new.header_bytes[8:]
        metadata = {
            "delta_kind": DELTA_KIND,
            "delta_parent_sha256": parent_sha256,
            "delta_sha256": child_sha256,
            "delta_depth": str(depth),
            "dense_header": header.rstrip(b" ").decode(),
            "dense_header_bytes": str(len(header)),
            **(extra_metadata or {}),
        }
        with SparseWriter(output, new.specs, metadata, reserve=0) as writer:
            for key, spec in new.specs.items():
                for start in range(0, spec.numel, _SLICE_ELEMENTS):
                    stop = min(start + _SLICE_ELEMENTS, spec.numel)
                    xor = new.read_bits(key, start, stop) ^ base.read_bits(key, start, stop)
                    writer.write(key, xor.view(spec.storage))
    return True


def delta_metadata(path: str | os.PathLike) -> dict[str, str] | None:
    """The delta metadata of a local file, or None if it is not a version delta."""
    with open_checkpoint(path, hashing=False) as ckpt:
        if isinstance(ckpt, SparseFile) and ckpt.metadata.get("delta_kind") == DELTA_KIND:
            return dict(ckpt.metadata)
    return None


def materialise(
    base: DenseReader, deltas: Sequence[str | os.PathLike], expected_sha256: str
) -> Iterator[bytes]:
    """The dense bytes of the version that is `base` plus `deltas` (local delta files, the
    base's child first), block by block; CheckpointError after the last block if they do not
    hash to `expected_sha256` (a reader streaming them on must drop what it got)."""
    if not deltas:
        raise ValueError("a chain has at least one delta")
    files = [open_checkpoint(path, hashing=False) for path in deltas]
    try:
        top = files[-1].metadata
        for ckpt in files:
            if not isinstance(ckpt, SparseFile) or ckpt.metadata.get("delta_kind") != DELTA_KIND:
                raise CheckpointError(f"{ckpt.path}: not a version delta")
            if dict(ckpt.specs) != dict(base.specs):
                raise CheckpointError(f"{ckpt.path}: its tensors are not its base's")
        length = int(top["dense_header_bytes"])
        header = struct.pack("<Q", length) + top["dense_header"].encode().ljust(length)
        entries = json.loads(top["dense_header"])
        entries.pop("__metadata__", None)
        order = sorted(entries, key=lambda key: entries[key]["data_offsets"][0])
        digest = hashlib.sha256(header)
        yield header
        for key in order:
            spec = base.specs[key]
            for start in range(0, spec.numel, _SLICE_ELEMENTS):
                stop = min(start + _SLICE_ELEMENTS, spec.numel)
                bits = base.read_bits(key, start, stop)
                for ckpt in files:
                    _xor_into(bits, ckpt, key, start)
                block = bits.tobytes()
                digest.update(block)
                yield block
        if digest.hexdigest() != expected_sha256:
            raise CheckpointError(
                f"materialised weights hash to {digest.hexdigest()}, not {expected_sha256}"
            )
    finally:
        for ckpt in files:
            ckpt.close()


def materialise_to(
    base: DenseReader, deltas: Sequence[str | os.PathLike], expected: str, target: Path
) -> None:
    """`materialise` into the local file `target`, atomically (nothing left on a mismatch)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as out:
            for block in materialise(base, deltas, expected):
                out.write(block)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
