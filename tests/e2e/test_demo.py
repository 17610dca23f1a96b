"""`make demo`'s script, as a new user runs it: the embedded service in the background, a
deletion request through the REST API, the evidence printed, then `--stop`. Nothing but this
machine: SQLite, the filesystem broker, the offline tiny CLIP."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import httpx

from negmerge.fixtures import ensure_tiny_clip

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_demo_unlearns_through_the_service_and_stops_it(tmp_path: Path) -> None:
    home, port = tmp_path / "demo", free_port()
    command = [sys.executable, str(REPO / "examples" / "demo.py"), "--home", str(home)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEGMERGE_")}
    env |= {"HF_HUB_OFFLINE": "1", "COLUMNS": "80"}  # a narrow terminal: nothing may wrap
    ensure_tiny_clip()  # cached: the demo must not say it is building them
    pid = None
    try:
        run = subprocess.run(
            [*command, "--port", str(port)],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        pid = int((home / "service.pid").read_text())
        log = (home / "service.log").read_text(errors="replace")[-3000:]
        assert run.returncode == 0, f"{run.stderr[-4000:]}\n--- service log ---\n{log}"
        printed = run.stdout + run.stderr
        assert "SUCCEEDED (final)" in printed and "before / after" in printed
        assert "target       forget_drop_min 0.5" in printed  # the default for a domain
        assert "verdict      MET" in printed or "verdict      NOT MET" in printed
        assert f"http://127.0.0.1:{port}/dashboard" in printed
        assert "building the offline fixture" not in printed

        # The CLI hint is one line, and it runs as printed.
        (hint,) = [line for line in printed.splitlines() if "NEGMERGE_API_KEY=$(cat" in line]
        assert hint.endswith(" jobs list"), hint
        listed = subprocess.run(
            ["bash", "-c", hint], env=env, capture_output=True, text=True, timeout=60
        )
        assert listed.returncode == 0, listed.stderr

        # The service is still up, and the key the demo left works for the API.
        key = (home / "api-key").read_text().strip()
        headers = {"Authorization": f"Bearer {key}"}
        jobs = httpx.get(f"http://127.0.0.1:{port}/v1/unlearning-jobs", headers=headers).json()
        (job,) = jobs["items"]
        assert job["state"] == "SUCCEEDED" and job["result"]["model"]["version"] == 2
        assert job["result"]["model"]["weights_sha256"] in printed
        sign_in = httpx.get(f"http://127.0.0.1:{port}/dashboard/sign-in")
        assert sign_in.status_code == 200

        stop = subprocess.run(
            [*command, "--stop"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
        )
        assert stop.returncode == 0 and f"stopped the demo service (pid {pid})" in stop.stderr
        # Said once it is true: no process of the service is left.
        assert not _alive(pid), "the service was said to be stopped but still runs"
        assert not _group_alive(pid), "the service's worker still runs"
        errors = [
            line
            for line in (home / "service.log").read_text(errors="replace").splitlines()
            if "ERROR" in line
        ]
        assert errors == [], errors  # a normal stop is not an error
    finally:
        if pid is not None and _alive(pid):
            os.killpg(pid, 9)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    # A stopped child of ours lingers as a zombie until reaped; the demo's is not ours.
    status = Path(f"/proc/{pid}/stat")
    return status.exists() and status.read_text().split()[2] != "Z"


def _group_alive(pgid: int) -> bool:
    """Whether a process of the group still runs (zombies, ended but not yet reaped by init,
    do not)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False
