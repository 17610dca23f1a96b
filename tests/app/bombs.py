"""Decompression bombs and oversize images for the upload tests, and a peak-memory probe.

Each bomb is a few hundred bytes to a few hundred KiB that decompresses to `BOMB_BYTES` of
zeros, built in a streaming way so that building it costs little memory itself.
"""

from __future__ import annotations

import bz2
import io
import lzma
import struct
import tarfile
import tracemalloc
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager

MiB = 1024 * 1024
# Large enough that materialising it is unmistakable, small enough to build in a second.
BOMB_BYTES = 128 * MiB
# A generous bound on what refusing a bomb may cost: bounded decompression needs about a
# chunk (1 MiB) and the decompressor's state; the old code needed the whole bomb (3x).
PEAK_BOUND = 64 * MiB
_ZEROS = b"\0" * (4 * MiB)


def _zeros(total: int) -> Iterator[bytes]:
    for _ in range(total // len(_ZEROS)):
        yield _ZEROS


def tar_bomb(compression: str, size: int = BOMB_BYTES) -> bytes:
    """A tar (gz, bz2 or xz) of one member of `size` zeros whose header says so."""
    compressor = {
        "gz": lambda: zlib.compressobj(9, wbits=31),
        "bz2": lambda: bz2.BZ2Compressor(9),
        "xz": lambda: lzma.LZMACompressor(preset=6),
    }[compression]()
    info = tarfile.TarInfo("zeros.bin")
    info.size = size
    parts = [compressor.compress(info.tobuf(format=tarfile.USTAR_FORMAT))]
    parts += [compressor.compress(chunk) for chunk in _zeros(size)]
    parts += [compressor.compress(b"\0" * 2 * tarfile.RECORDSIZE), compressor.flush()]
    return b"".join(parts)


def tar_pax_bomb(size: int = 64 * MiB) -> bytes:
    """A tar.gz whose first header is a pax header of `size` bytes (tarfile reads it whole)."""
    compressor = zlib.compressobj(9, wbits=31)
    info = tarfile.TarInfo("././@PaxHeader")
    info.type, info.size = tarfile.XHDTYPE, size
    parts = [compressor.compress(info.tobuf(format=tarfile.USTAR_FORMAT))]
    parts += [compressor.compress(chunk) for chunk in _zeros(size)]
    parts += [compressor.compress(b"\0" * 2 * tarfile.RECORDSIZE), compressor.flush()]
    return b"".join(parts)


def zip_bomb(method: int, size: int = BOMB_BYTES, declared: int = 1000) -> bytes:
    """A zip of one member of `size` zeros whose headers (local and central) claim only
    `declared` bytes, so that no check of declared sizes or ratios can catch it."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", method) as zf, zf.open("zeros.bin", "w") as member:
        for chunk in _zeros(size):
            member.write(chunk)
    data = bytearray(buffer.getvalue())
    local = data.index(b"PK\x03\x04")
    struct.pack_into("<L", data, local + 22, declared)  # uncompressed size
    central = data.index(b"PK\x01\x02")
    struct.pack_into("<L", data, central + 24, declared)
    return bytes(data)


def png_header_bomb(width: int, height: int) -> bytes:
    """A valid 1-bit greyscale PNG of width x height black pixels: small on disk (one zlib
    stream of zero rows), width x height x 3 bytes once decoded to RGB."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">L", len(body)) + kind + body + struct.pack(">L", zlib.crc32(kind + body))
        )

    row = b"\0" * (1 + (width + 7) // 8)  # filter byte 0, then the packed pixels
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">LLBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )


@contextmanager
def peak_memory() -> Iterator[list[int]]:
    """Python's peak traced allocation (all threads; the compression modules allocate
    through it) during the block, appended to the yielded list at its end."""
    peak: list[int] = []
    tracemalloc.start()
    tracemalloc.reset_peak()
    try:
        yield peak
    finally:
        peak.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
