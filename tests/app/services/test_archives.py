"""Unpacking archives: every supported compression round-trips, every bomb is stopped with
bounded memory, and no member name, link or special file gets anything outside the folder."""

from __future__ import annotations

import bz2
import io
import lzma
import struct
import tarfile
import zipfile
from pathlib import Path

import pytest

from app.services.archives import ArchiveError, ArchiveLimits, extract_archive
from tests.app.bombs import (
    PEAK_BOUND,
    MiB,
    peak_memory,
    tar_bomb,
    tar_pax_bomb,
    zip_bomb,
)

LIMITS = ArchiveLimits(max_bytes=8 * MiB, max_members=1000, max_ratio=50)
FILES = {"manifest.jsonl": b'{"id": "a"}\n' * 50, "img/a.png": bytes(range(256)) * 40}


def _tar(files: dict[str, bytes], mode: str = "w") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as tf:  # type: ignore[call-overload]
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _zip(files: dict[str, bytes], method: int) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", method) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def _unpack(tmp_path: Path, data: bytes, limits: ArchiveLimits = LIMITS) -> Path:
    archive = tmp_path / "upload"
    archive.write_bytes(data)
    dest = tmp_path / "out"
    extract_archive(archive, dest, limits)
    return dest


def _contents(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }


@pytest.mark.parametrize(
    "make",
    [
        lambda: _zip(FILES, zipfile.ZIP_STORED),
        lambda: _zip(FILES, zipfile.ZIP_DEFLATED),
        lambda: _zip(FILES, zipfile.ZIP_BZIP2),
        lambda: _zip(FILES, zipfile.ZIP_LZMA),
        lambda: _tar(FILES),
        lambda: _tar(FILES, "w:gz"),
        lambda: _tar(FILES, "w:bz2"),
        lambda: _tar(FILES, "w:xz"),
        lambda: bz2.compress(_tar(FILES)[:1024]) + bz2.compress(_tar(FILES)[1024:]),
        lambda: lzma.compress(_tar(FILES)[:1024]) + lzma.compress(_tar(FILES)[1024:]),
    ],
    ids=[
        "zip",
        "zip-deflate",
        "zip-bzip2",
        "zip-lzma",
        "tar",
        "tgz",
        "tbz2",
        "txz",
        "tbz2-two-streams",
        "txz-two-streams",
    ],  # fmt: skip
)
def test_every_supported_compression_unpacks_exactly(tmp_path, make):
    assert _contents(_unpack(tmp_path, make())) == FILES


@pytest.mark.parametrize(
    "make",
    [
        lambda: tar_bomb("bz2"),
        lambda: tar_bomb("gz"),
        lambda: tar_bomb("xz"),
        lambda: zip_bomb(zipfile.ZIP_BZIP2),
        lambda: zip_bomb(zipfile.ZIP_LZMA),
        lambda: zip_bomb(zipfile.ZIP_DEFLATED),
        tar_pax_bomb,
    ],
    ids=["tar-bz2", "tar-gz", "tar-xz", "zip-bzip2", "zip-lzma", "zip-deflate", "tar-pax"],
)
def test_bombs_are_refused_with_bounded_memory(tmp_path, make):
    data = make()
    with peak_memory() as peak, pytest.raises(ArchiveError) as refused:
        _unpack(tmp_path, data)
    assert peak[0] < PEAK_BOUND, f"refusing it took {peak[0] / MiB:.0f} MiB"
    assert any(
        words in str(refused.value)
        for words in ("larger than its header says", "Bad CRC-32", "more than", "metadata")
    ), refused.value


def test_a_bomb_within_the_byte_limit_is_stopped_by_the_ratio_as_it_streams(tmp_path):
    data = tar_bomb("bz2", size=16 * MiB)
    limits = ArchiveLimits(max_bytes=512 * MiB, max_members=1000, max_ratio=100)
    with peak_memory() as peak, pytest.raises(ArchiveError, match="decompression bomb"):
        _unpack(tmp_path, data, limits)
    assert peak[0] < PEAK_BOUND
    written = sum(p.stat().st_size for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert written <= 100 * len(data) + MiB  # stopped at the ratio, not at the end


def test_the_decompressor_memory_is_capped(tmp_path):
    small = ArchiveLimits(8 * MiB, 1000, 50, max_decompressor_memory=1 * MiB)
    # xz's and zip lzma's default preset asks for an 8 MiB dictionary.
    with pytest.raises(ArchiveError, match="max_decompressor_memory_bytes=1048576"):
        _unpack(tmp_path, _tar(FILES, "w:xz"), small)
    (tmp_path / "zip").mkdir()
    with pytest.raises(ArchiveError, match="lzma dictionary"):
        _unpack(tmp_path / "zip", _zip(FILES, zipfile.ZIP_LZMA), small)


def _tar_member(kind: bytes, name: str = "evil", linkname: str = "") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tf:
        info = tarfile.TarInfo(name)
        info.type, info.linkname = kind, linkname
        tf.addfile(info)
    return buffer.getvalue()


def _zip_member(name: str, mode: int = 0, flags: int = 0) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        info = zipfile.ZipInfo(name)
        info.external_attr = mode << 16
        zf.writestr(info, b"data")
    data = bytearray(buffer.getvalue())
    if flags:  # zipfile writes no flags of its choosing: set them in both headers
        struct.pack_into("<H", data, data.index(b"PK\x03\x04") + 6, flags)
        struct.pack_into("<H", data, data.index(b"PK\x01\x02") + 8, flags)
    return bytes(data)


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda: _tar_member(tarfile.SYMTYPE, "img/a.png", "/etc/passwd"), "is a link"),
        (lambda: _tar_member(tarfile.LNKTYPE, "img/a.png", "/etc/passwd"), "is a link"),
        (lambda: _tar_member(tarfile.CHRTYPE, "dev"), "not a regular file"),
        (lambda: _tar_member(tarfile.BLKTYPE, "dev"), "not a regular file"),
        (lambda: _tar_member(tarfile.FIFOTYPE, "fifo"), "not a regular file"),
        (lambda: _tar({"/etc/cron.d/evil": b"x"}), "leaves the archive's root"),
        (lambda: _tar({"a/../../evil": b"x"}), "leaves the archive's root"),
        (lambda: _zip_member("..\\evil"), "leaves the archive's root"),
        (lambda: _zip_member("C:/Windows/evil"), "leaves the archive's root"),
        (lambda: _zip_member("/abs"), "leaves the archive's root"),
        (lambda: _zip_member("link", 0o120777), "is a link"),
        (lambda: _zip_member("fifo", 0o010644), "not a regular file"),
        (lambda: _zip_member("secret", flags=0x1), "is encrypted"),
    ],
    ids=[
        "tar-symlink",
        "tar-hardlink",
        "tar-char-device",
        "tar-block-device",
        "tar-fifo",
        "tar-absolute",
        "tar-climb",
        "zip-backslash-climb",
        "zip-drive",
        "zip-absolute",
        "zip-symlink",
        "zip-fifo",
        "zip-encrypted",
    ],  # fmt: skip
)
def test_names_links_and_special_files_cannot_escape(tmp_path, make, words):
    with pytest.raises(ArchiveError, match=words):
        _unpack(tmp_path, make())
    outside = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")}
    assert outside <= {"upload", "out"}, outside  # nothing beside the folder, nothing in it


def test_more_than_the_archive_members_limit_is_refused(tmp_path):
    many = {f"f{i}": b"" for i in range(LIMITS.max_members + 1)}
    with pytest.raises(ArchiveError, match="more than 1000 members"):
        _unpack(tmp_path, _tar(many, "w:gz"))


@pytest.mark.parametrize("prefix", [b"", b"#!/bin/sh\nexit 0\n"], ids=["zip", "self-extractor"])
def test_a_zip_with_too_many_entries_is_refused_before_they_are_read(tmp_path, prefix):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for i in range(20_000):
            zf.writestr(str(i), b"")
    data = prefix + buffer.getvalue()
    limits = ArchiveLimits(8 * MiB, max_members=100, max_ratio=50)
    with peak_memory() as peak, pytest.raises(ArchiveError, match="more than 100 members"):
        _unpack(tmp_path, data, limits)
    assert peak[0] < 1 * MiB  # zipfile's reading the 20,000 entries would take about 10 MiB
    exactly = ArchiveLimits(8 * MiB, max_members=20_000, max_ratio=50)
    (tmp_path / "again").mkdir()
    assert len(list(_unpack(tmp_path / "again", data, exactly).iterdir())) == 20_000
