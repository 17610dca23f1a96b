"""Unpacking an uploaded data set archive (zip or tar) without trusting anything in it.

Refused, with the member named: paths that are absolute or climb out of the root, links
(symbolic or hard), devices and other special files, a member named twice, more members or
more unpacked bytes than allowed, and members or archives that expand more than
`max_ratio` times (decompression bombs). Sizes are counted as bytes are written, not taken
from headers, which can lie. Nothing outside `dest` is ever written.
"""

from __future__ import annotations

import stat
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from negmerge.data import safe_relative_path
from negmerge.errors import DataError

_CHUNK = 1024 * 1024
# Tiny members compress well without being bombs (a manifest of repeated labels); the ratio
# rule applies from this size on.
_RATIO_FLOOR = 1024 * 1024


class ArchiveError(ValueError):
    """The archive is unsafe or malformed; the message names the member."""


@dataclass(frozen=True)
class ArchiveLimits:
    max_bytes: int
    max_members: int
    max_ratio: float


def extract_archive(archive: Path, dest: Path, limits: ArchiveLimits) -> None:
    """Unpack the zip or tar file `archive` into the empty folder `dest`, or raise ArchiveError."""
    dest.mkdir(parents=True, exist_ok=True)
    archive_size = max(archive.stat().st_size, 1)
    writer = _Writer(dest, limits, archive_size)
    if zipfile.is_zipfile(archive):
        _extract_zip(archive, writer)
    elif _is_tar(archive):
        _extract_tar(archive, writer)
    else:
        raise ArchiveError("file: not a zip or tar archive")


def _is_tar(archive: Path) -> bool:
    try:
        return tarfile.is_tarfile(archive)
    except (OSError, tarfile.TarError, EOFError):
        return False


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

    def write(self, name: str, source: BinaryIO, declared: int, compressed: int | None) -> None:
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
                while chunk := source.read(_CHUNK):
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


def _extract_zip(archive: Path, writer: _Writer) -> None:
    try:
        with zipfile.ZipFile(archive) as zf:
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
                with zf.open(info) as source:
                    writer.write(name, source, info.file_size, info.compress_size)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, EOFError) as exc:
        raise ArchiveError(f"file: not a readable zip archive ({exc})") from None


def _extract_tar(archive: Path, writer: _Writer) -> None:
    try:
        # Stream mode ("r|*"): members are checked as they come, so a bomb is stopped at its
        # first oversize header instead of after decompressing everything to list members.
        with tarfile.open(archive, "r|*") as tf:
            for member in tf:
                name = writer.check_name(member.name)
                if member.issym() or member.islnk():
                    raise ArchiveError(f"file: member {member.name!r} is a link")
                if member.isdir():
                    continue
                if not member.isreg():
                    raise ArchiveError(f"file: member {member.name!r} is not a regular file")
                if writer.total + member.size > writer.limits.max_bytes:
                    raise ArchiveError(
                        f"file: unpacks to more than {writer.limits.max_bytes} bytes"
                    )
                source = tf.extractfile(member)
                assert source is not None  # a regular file always has data
                writer.write(name, source, member.size, None)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise ArchiveError(f"file: not a readable tar archive ({exc})") from None
