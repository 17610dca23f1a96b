"""Keep the database, broker and object store credentials out of the environment that steps
run in.

A step reads tenants' files (images, checkpoints) through third-party decoders, and may start
processes of its own (data loaders, compilers). None of that needs the database URL or the
broker URL, so once the settings have been read (once, at start), the worker's parent drops
those variables, before its pool forks the children that run the steps: a child's os.environ,
its /proc/<pid>/environ and every process it starts lack them, and so does the parent's.

The processes still hold the credentials in memory: a step claims its lease and records its
outcome in the database. This takes away the easy routes to them; keeping tenant code off the
workers altogether is the job of the architecture registry (negmerge.models.architectures).
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Iterable
from pathlib import Path

CREDENTIALS = (
    "NEGMERGE_DATABASE_URL",
    "NEGMERGE_BROKER_URL",
    # An s3:// artifact root's keys: the steps reach the store with the settings in memory.
    "NEGMERGE_ARTIFACT_S3_ACCESS_KEY_ID",
    "NEGMERGE_ARTIFACT_S3_SECRET_ACCESS_KEY",
)


def forget_credentials(names: Iterable[str] = CREDENTIALS) -> list[str]:
    """Remove `names` from this process's environment, including the copy the kernel shows
    as /proc/<pid>/environ; the names that were set."""
    removed = [name for name in names if name in os.environ]
    for name in removed:
        del os.environ[name]  # unsetenv: no longer in environ(7), nor in processes started
    _blank_initial_environment(removed)
    return removed


def _blank_initial_environment(names: list[str]) -> None:
    """/proc/<pid>/environ shows the block the process was started with, whatever it unset
    since (and so do its forked children): overwrite those entries with NULs. Linux only; the
    block is this process's own memory, which nothing refers to once the variables are unset."""
    if not names or not sys.platform.startswith("linux"):
        return
    try:
        stat = Path("/proc/self/stat").read_text()
        start = int(stat[stat.rindex(")") + 2 :].split()[47])  # proc(5) field 50: env_start
        block = Path("/proc/self/environ").read_bytes()
    except (OSError, ValueError, IndexError):
        return
    if not start or ctypes.string_at(start, len(block)) != block:
        return  # not the block we think it is: leave it alone
    prefixes = tuple(f"{name}=".encode() for name in names)
    offset = 0
    for entry in block.split(b"\0"):
        if entry.startswith(prefixes):
            ctypes.memset(start + offset, 0, len(entry))
        offset += len(entry) + 1
