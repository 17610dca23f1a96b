"""Least privilege on the workers: the processes that run steps have no database
or broker credentials in their environment, and the images run as a user that is not root."""

from __future__ import annotations

import re
import time
from pathlib import Path

from worker.credentials import CREDENTIALS

REPO = Path(__file__).resolve().parents[2]


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (read from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        if int(text[text.rindex(")") + 2 :].split()[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def test_the_processes_that_run_steps_have_no_credentials_in_their_environment(
    start_worker, settings
):
    worker = start_worker("no-credentials")
    try:
        deadline = time.monotonic() + 30
        while not (pool := children(worker.process.pid)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert pool, "the worker started no pool process"
        for pid in (worker.process.pid, *pool):
            environment = Path(f"/proc/{pid}/environ").read_bytes()
            for name in CREDENTIALS:
                assert f"{name}=".encode() not in environment, (pid, name)
            assert settings.database_url.encode() not in environment
            assert settings.broker_url.encode() not in environment
            # Only the credentials go: the rest of the settings are still there.
            assert f"NEGMERGE_ARTIFACT_ROOT={settings.artifact_root}".encode() in environment
    finally:
        worker.stop()


def test_the_images_run_as_a_user_that_is_not_root():
    for dockerfile in sorted((REPO / "docker").glob("Dockerfile.*")):
        text = dockerfile.read_text()
        users = re.findall(r"^USER\s+(\S+)\s*$", text, flags=re.M)
        assert users, f"{dockerfile.name}: no USER: it runs as root"
        user = users[-1].split(":")[0]
        assert user not in ("root", "0"), dockerfile.name
        assert text.index(f"USER {users[-1]}") < text.index("\nCMD"), dockerfile.name
        assert re.search(rf"useradd\b[^\n]*\b{user}\b", text), f"{dockerfile.name}: no {user}"
