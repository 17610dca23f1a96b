"""Unpacking an uploaded data set archive (zip or tar) without trusting anything in it.

Refused, with the member named: paths that are absolute or climb out of the root, links
(symbolic or hard), devices and other special files, encrypted members, a member named
twice, more members or more unpacked bytes than allowed, and members or archives that
expand more than `max_ratio` times (decompression bombs). Nothing outside `dest` is ever
written.

Decompression is bounded before anything is allocated: every member is decompressed in
chunks of at most `_CHUNK` bytes (the decompressors' `max_length`), counted as the chunks
arrive and stopped at the limits; sizes in headers are never trusted. The memory an archive
can cost is one chunk plus the decompressor's state: 32 KiB for deflate/gzip, under 4 MiB
for bzip2, and for xz/lzma the dictionary the archive declares, refused above
`max_decompressor_memory`. The standard library's own tar stream reader (mode "r|*") is not
used for compressed tars: it decompresses a whole buffer at once, so 180 bytes of bzip2
became 1 GiB in memory before any check ran.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import stat
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from negmerge.data import safe_relative_path
from negmerge.errors import DataError

_CHUNK = 1024 * 1024
# Tiny members compress well without being bombs (a manifest of repeated labels); the ratio
# rule applies from this size on.
_RATIO_FLOOR = 1024 * 1024
# Tar's metadata headers (pax, GNU long names) are read whole by tarfile: each is capped, and
# so is their sum over the archive. Real ones hold a path and a few attributes.
_MAX_META_BYTES = 256 * 1024
_META_TYPES = frozenset(
    {tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME}
    | {tarfile.GNUTYPE_LONGLINK}
)


class ArchiveError(ValueError):
    """The archive is unsafe or malformed; the message names the member."""


@dataclass(frozen=True)
class ArchiveLimits:
    max_bytes: int
    max_members: int
    max_ratio: float
    max_decompressor_memory: int = 128 * 1024 * 1024


def extract_archive(archive: Path, dest: Path, limits: ArchiveLimits) -> None:
    """Unpack the zip or tar file `archive` into the empty folder `dest`, or raise ArchiveError."""
    dest.mkdir(parents=True, exist_ok=True)
    archive_size = max(archive.stat().st_size, 1)
    writer = _Writer(dest, limits, archive_size)
    if zipfile.is_zipfile(archive):
        _extract_zip(archive, writer)
        return
    with open(archive, "rb") as raw:
        stream = _tar_stream(raw, limits)
        if stream is None:
            raise ArchiveError("file: not a zip or tar archive")
        _extract_tar(stream, writer)


def _chunks(source: BinaryIO) -> Iterator[bytes]:
    """`source` read in bounded chunks (never read() without a size)."""
    while chunk := source.read(_CHUNK):
        yield chunk


class _Writer:
    """Writes members into `dest`, enforcing the limits as bytes arrive."""

    def __init__(self, dest: Path, limits: ArchiveLimits, archive_size: int) -> None:
        self.dest, self.limits, self.archive_size = dest, limits, archive_size
        self.members, self.total = 0, 0
        self.names: set[str] = set()

    def check_name(self, name: str) -> str:
        self.members += 1
        if self.members > self.limits.max_members:
            raise ArchiveError(f"file: more than {self.limits.max_members} members")
        try:
            normal = safe_relative_path(name, "archive")
        except DataError:
            raise ArchiveError(f"file: member {name!r} leaves the archive's root") from None
        if normal == "." or "\x00" in normal:
            raise ArchiveError(f"file: member {name!r} has no usable name")
        if normal in self.names:
            raise ArchiveError(f"file: member {name!r} appears twice")
        self.names.add(normal)
        return normal

    def write(
        self, name: str, chunks: Iterable[bytes], declared: int, compressed: int | None
    ) -> None:
        ratio = declared / max(compressed or 1, 1)
        if compressed is not None and declared > _RATIO_FLOOR and ratio > self.limits.max_ratio:
            raise ArchiveError(
                f"file: member {name!r} expands {ratio:.0f} times "
                f"(limit {self.limits.max_ratio:g}): a decompression bomb?"
            )
        target = self.dest / name
        written = 0
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(target, "xb") as out:  # "x": never through an existing file or link
                for chunk in chunks:
                    written += len(chunk)
                    self.total += len(chunk)
                    if written > declared:
                        raise ArchiveError(f"file: member {name!r} is larger than its header says")
                    self._check_total()
                    out.write(chunk)
        except OSError as exc:  # e.g. a file and a folder of the same name
            raise ArchiveError(f"file: member {name!r} cannot be unpacked ({exc})") from None

    def _check_total(self) -> None:
        if self.total > self.limits.max_bytes:
            raise ArchiveError(f"file: unpacks to more than {self.limits.max_bytes} bytes")
        if self.total > _RATIO_FLOOR and self.total > self.limits.max_ratio * self.archive_size:
            raise ArchiveError(
                f"file: expands more than {self.limits.max_ratio:g} times: a decompression bomb?"
            )


# ---- zip ------------------------------------------------------------------------------------

# The local file header: signature, versions, flags, method, time, date, CRC, sizes, and the
# lengths of the name and extra field that come before the member's data (APPNOTE 4.3.7).
_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")
_ENCRYPTED = 0x1


# The end of central directory record (APPNOTE 4.3.16), its zip64 locator (4.3.15) and the
# zip64 record (4.3.14), and the fixed part of a central directory entry (4.3.12).
_END = struct.Struct("<4s4H2LH")
_ZIP64_LOCATOR = struct.Struct("<4sLQL")
_ZIP64_END = struct.Struct("<4sQ2H2L4Q")
_CENTRAL_ENTRY = struct.Struct("<4s4B4HL2L5H2L")


def _check_zip_member_count(raw: BinaryIO, limit: int) -> None:
    """Count the central directory's entries before zipfile reads them all into memory
    (about 500 bytes each: a 512 MiB archive of empty entries would take 3 GiB)."""
    raw.seek(0, 2)
    size = raw.tell()
    tail_start = max(0, size - _END.size - 0xFFFF)
    raw.seek(tail_start)
    tail = raw.read()
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or len(tail) - at < _END.size:
        return  # zipfile will say what is wrong
    *_, cd_size, cd_offset, _comment = _END.unpack_from(tail, at)
    end_offset = tail_start + at
    locator_at = at - _ZIP64_LOCATOR.size
    if locator_at >= 0 and tail[locator_at : locator_at + 4] == b"PK\x06\x07":
        _, _, zip64_offset, _ = _ZIP64_LOCATOR.unpack_from(tail, locator_at)
        raw.seek(zip64_offset)
        record = raw.read(_ZIP64_END.size)
        if len(record) == _ZIP64_END.size and record[:4] == b"PK\x06\x06":
            *_, cd_size, cd_offset = _ZIP64_END.unpack(record)
            end_offset = zip64_offset
    # As zipfile does: data prepended to the archive (a self-extractor) shifts every offset.
    position = cd_offset + max(0, end_offset - cd_size - cd_offset)
    end = position + cd_size
    for _ in range(limit + 1):
        if position >= end:
            return
        raw.seek(position)
        entry = raw.read(_CENTRAL_ENTRY.size)
        if len(entry) < _CENTRAL_ENTRY.size or entry[:4] != b"PK\x01\x02":
            return  # not a central directory (any more): zipfile will say so
        name_length, extra_length, comment_length = _CENTRAL_ENTRY.unpack(entry)[12:15]
        position += _CENTRAL_ENTRY.size + name_length + extra_length + comment_length
    raise ArchiveError(f"file: more than {limit} members")


def _extract_zip(archive: Path, writer: _Writer) -> None:
    with open(archive, "rb") as raw:
        _check_zip_member_count(raw, writer.limits.max_members)
    try:
        with zipfile.ZipFile(archive) as zf, open(archive, "rb") as raw:
            infos = zf.infolist()
            if len(infos) > writer.limits.max_members:
                raise ArchiveError(f"file: more than {writer.limits.max_members} members")
            if sum(i.file_size for i in infos) > writer.limits.max_bytes:
                raise ArchiveError(f"file: unpacks to more than {writer.limits.max_bytes} bytes")
            for info in infos:
                name = writer.check_name(info.filename)
                mode = info.external_attr >> 16
                if stat.S_ISLNK(mode):
                    raise ArchiveError(f"file: member {info.filename!r} is a link")
                if info.is_dir():
                    continue
                kind = stat.S_IFMT(mode)  # 0: no type recorded (Windows tools, writestr)
                if kind and kind != stat.S_IFREG:
                    raise ArchiveError(f"file: member {info.filename!r} is not a regular file")
                if info.flag_bits & _ENCRYPTED:
                    raise ArchiveError(f"file: member {info.filename!r} is encrypted")
                chunks = _zip_member(zf, raw, info, writer.limits)
                writer.write(name, chunks, info.file_size, info.compress_size)
    except (
        zipfile.BadZipFile,
        zipfile.LargeZipFile,
        NotImplementedError,
        EOFError,
        OSError,
    ) as exc:
        raise ArchiveError(f"file: not a readable zip archive ({exc})") from None
    except (lzma.LZMAError, zlib.error) as exc:
        raise ArchiveError(f"file: a zip member is damaged ({exc})") from None


def _zip_member(
    zf: zipfile.ZipFile, raw: BinaryIO, info: zipfile.ZipInfo, limits: ArchiveLimits
) -> Iterator[bytes]:
    """The member's bytes in bounded chunks. Stored and deflated members come through
    zipfile, whose deflate honours the size asked for; bzip2 and lzma members do not there
    (zipfile decompresses whole reads of them), so they are decompressed here."""
    method = info.compress_type
    if method in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        with zf.open(info) as source:
            yield from _chunks(source)
        return
    if method not in (zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA):
        raise ArchiveError(
            f"file: member {info.filename!r} uses compression method {method}; "
            "use stored, deflate, bzip2 or lzma"
        )
    compressed = _ZipData(raw, info)
    decompressor = (
        bz2.BZ2Decompressor()
        if method == zipfile.ZIP_BZIP2
        else _zip_lzma(compressed, info, limits)
    )
    crc = 0
    for chunk in _chunks(_Decompressed(compressed, lambda: decompressor, multistream=False)):
        crc = zlib.crc32(chunk, crc)
        yield chunk
    if crc != info.CRC:
        raise ArchiveError(f"file: member {info.filename!r} is damaged (CRC mismatch)")


class _ZipData:
    """A member's compressed bytes: `compress_size` bytes after its local header."""

    def __init__(self, raw: BinaryIO, info: zipfile.ZipInfo) -> None:
        raw.seek(info.header_offset)
        header = raw.read(_LOCAL_HEADER.size)
        if len(header) != _LOCAL_HEADER.size or header[:4] != b"PK\x03\x04":
            raise ArchiveError(f"file: member {info.filename!r} has no valid local header")
        *_, name_length, extra_length = _LOCAL_HEADER.unpack(header)
        raw.seek(name_length + extra_length, 1)
        self.raw, self.name, self.left = raw, info.filename, info.compress_size

    def read(self, size: int) -> bytes:
        wanted = min(size, self.left)
        chunk = self.raw.read(wanted)
        if len(chunk) < wanted:
            raise ArchiveError(f"file: member {self.name!r} is truncated")
        self.left -= len(chunk)
        return chunk


def _zip_lzma(
    compressed: _ZipData, info: zipfile.ZipInfo, limits: ArchiveLimits
) -> lzma.LZMADecompressor:
    """A raw LZMA1 decompressor from the member's 4-byte header and 5 property bytes
    (APPNOTE 5.8.8); its dictionary, which the decoder allocates, is checked first."""
    head = compressed.read(9)
    if len(head) < 9 or head[2:4] != b"\x05\x00":
        raise ArchiveError(f"file: member {info.filename!r} has no valid lzma header")
    properties, dict_size = head[4], int.from_bytes(head[5:9], "little")
    if properties >= 9 * 5 * 5:
        raise ArchiveError(f"file: member {info.filename!r} has invalid lzma properties")
    if dict_size > limits.max_decompressor_memory:
        raise ArchiveError(
            f"file: member {info.filename!r} needs a {dict_size}-byte lzma dictionary, more "
            f"than max_decompressor_memory_bytes={limits.max_decompressor_memory}"
        )
    lc, rest = properties % 9, properties // 9
    lp, pb = rest % 5, rest // 5
    return lzma.LZMADecompressor(
        lzma.FORMAT_RAW,
        filters=[{"id": lzma.FILTER_LZMA1, "dict_size": dict_size, "lc": lc, "lp": lp, "pb": pb}],
    )


class _Decompressed:
    """What a bzip2 or lzma decompressor makes of `source`, read in pieces of at most
    `_CHUNK` bytes: input is fed only when the decompressor asks for it, and no call returns
    more than `max_length`. With `multistream`, concatenated streams are read one after the
    other (as pbzip2 and xz -T write them); a truncated stream just ends (tar and the zip
    member's CRC notice)."""

    def __init__(
        self,
        source: BinaryIO | _ZipData,
        new_decompressor: Callable[[], bz2.BZ2Decompressor | lzma.LZMADecompressor],
        multistream: bool,
    ) -> None:
        self.source, self.new_decompressor, self.multistream = source, new_decompressor, multistream
        self.decompressor = new_decompressor()
        self.pending = b""

    def read(self, size: int) -> bytes:
        size = min(size, _CHUNK) if size >= 0 else _CHUNK
        while True:
            if self.decompressor.eof:
                self.pending = self.decompressor.unused_data or self.source.read(_CHUNK)
                if not self.multistream or not self.pending:
                    return b""
                self.decompressor = self.new_decompressor()
            data = b""
            if self.decompressor.needs_input:
                data, self.pending = self.pending or self.source.read(_CHUNK), b""
                if not data:
                    return b""
            chunk = self.decompressor.decompress(data, size)
            if chunk:
                return chunk


# ---- tar ------------------------------------------------------------------------------------


class _Capped:
    """A decompressed tar stream that ends in ArchiveError past `limit` bytes: the members'
    data and their headers can never make the decompressor produce more."""

    def __init__(self, source: BinaryIO, limit: int) -> None:
        self.source, self.left = source, limit

    def read(self, size: int) -> bytes:
        chunk = self.source.read(min(size, _CHUNK) if size >= 0 else _CHUNK)
        self.left -= len(chunk)
        if self.left < 0:
            raise ArchiveError("file: the tar stream is larger than its members can be")
        return chunk


def _tar_stream(raw: BinaryIO, limits: ArchiveLimits) -> _Capped | None:
    """The decompressed tar stream of `raw` (gzip, bzip2, xz or none), or None if it is not
    a tar archive."""
    magic = raw.read(6)
    raw.seek(0)
    source: BinaryIO
    if magic.startswith(b"\x1f\x8b"):
        source = gzip.GzipFile(fileobj=raw)  # type: ignore[assignment]
    elif magic.startswith(b"BZh"):
        source = _Decompressed(raw, bz2.BZ2Decompressor, multistream=True)  # type: ignore[assignment]
    elif magic.startswith((b"\xfd7zXZ\x00", b"\x5d\x00\x00\x80")):  # xz, and lzma's own
        memlimit = limits.max_decompressor_memory  # the dictionary the stream asks for
        source = _Decompressed(  # type: ignore[assignment]
            raw, lambda: lzma.LZMADecompressor(memlimit=memlimit), multistream=True
        )
    else:
        try:
            tarfile.TarInfo.frombuf(raw.read(tarfile.BLOCKSIZE), "utf-8", "surrogateescape")
        except tarfile.HeaderError:
            return None
        raw.seek(0)
        source = raw
    # Data, plus a header and padding per member, the metadata headers and the end blocks.
    overhead = (limits.max_members + 2) * 2 * tarfile.BLOCKSIZE + 2 * tarfile.RECORDSIZE
    return _Capped(source, limits.max_bytes + overhead + _MAX_META_BYTES)


class _CheckedTarInfo(tarfile.TarInfo):
    """Refuses oversize metadata headers (which tarfile reads into memory whole) and GNU
    sparse members, before tarfile reads them."""

    def _proc_member(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type == tarfile.GNUTYPE_SPARSE:
            raise ArchiveError(f"file: member {self.name!r} is a sparse file")
        if self.type in _META_TYPES:
            seen = getattr(tarfile_, "meta_bytes", 0) + tarfile.BLOCKSIZE + self.size
            tarfile_.meta_bytes = seen  # type: ignore[attr-defined]
            if seen > _MAX_META_BYTES:
                raise ArchiveError(f"file: more than {_MAX_META_BYTES} bytes of tar metadata")
        return super()._proc_member(tarfile_)  # type: ignore[misc]


def _extract_tar(stream: _Capped, writer: _Writer) -> None:
    try:
        # Stream mode over our own bounded stream: members are checked as they come, so a
        # bomb is stopped at its first oversize header or chunk.
        with tarfile.open(fileobj=stream, mode="r|", tarinfo=_CheckedTarInfo) as tf:  # type: ignore[call-overload]
            for member in tf:
                name = writer.check_name(member.name)
                if member.issym() or member.islnk():
                    raise ArchiveError(f"file: member {member.name!r} is a link")
                if member.isdir():
                    continue
                if not member.isreg() or member.issparse():
                    raise ArchiveError(f"file: member {member.name!r} is not a regular file")
                if writer.total + member.size > writer.limits.max_bytes:
                    raise ArchiveError(
                        f"file: unpacks to more than {writer.limits.max_bytes} bytes"
                    )
                source = tf.extractfile(member)
                assert source is not None  # a regular file always has data
                writer.write(name, _chunks(source), member.size, None)
    except lzma.LZMAError as exc:
        if "memory" in str(exc).lower():
            raise ArchiveError(
                "file: the xz stream needs more memory than max_decompressor_memory_bytes="
                f"{writer.limits.max_decompressor_memory}"
            ) from None
        raise ArchiveError(f"file: not a readable tar archive ({exc})") from None
    except RecursionError:  # a chain of metadata headers, each pointing to the next
        raise ArchiveError("file: tar metadata headers are nested too deep") from None
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise ArchiveError(f"file: not a readable tar archive ({exc})") from None
