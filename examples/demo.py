"""`make demo`: the service on this machine, end to end, through its REST API.

1. builds the offline fixtures once (a tiny CLIP that knows two image domains, digits and
   generated shapes; about a minute);
2. starts the embedded service in the background (`negmerge serve`: the API, one worker and
   the watchdog; SQLite and a filesystem broker under var/demo, nothing to install);
3. creates a tenant and an API key, registers the model and the two data sets;
4. submits a deletion request: forget the shapes domain, keep the digits (the paper's CLIP
   experiment in miniature), follows it with a progress bar, and prints the evidence and
   the verdict (the default target for a domain: forget accuracy at most half the original's);
5. leaves the service running for the dashboard and `negmerge-client`; `make demo-stop`
   stops it.

    python examples/demo.py [--port 8000] [--home var/demo]
    python examples/demo.py --stop
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console

from negmerge_client import ServiceClient, ServiceError
from negmerge_client.cli.progress import JobProgress
from negmerge_client.cli.report import print_report

out = Console(stderr=True)


def service_env(home: Path, data_roots: list[Path]) -> dict[str, str]:
    """The embedded service's settings: everything under `home`."""
    return {
        **os.environ,
        "NEGMERGE_DATABASE_URL": f"sqlite:///{home / 'negmerge.db'}",
        "NEGMERGE_BROKER_URL": "filesystem://",
        "NEGMERGE_BROKER_FOLDER": str(home / "broker"),
        "NEGMERGE_ARTIFACT_ROOT": str(home / "artifacts"),
        "NEGMERGE_DATA_ROOTS": json.dumps([str(root) for root in data_roots]),
        "HF_HUB_OFFLINE": "1",
    }


def running_pid(home: Path) -> int | None:
    """The pid of the demo service started from `home`, if it is still alive."""
    try:
        pid = int((home / "service.pid").read_text())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


def start_service(home: Path, port: int, env: dict[str, str]) -> str:
    """`negmerge serve` in its own session (it outlives this script); its URL, once it answers."""
    url = f"http://127.0.0.1:{port}"
    pid = running_pid(home)
    if pid is None:
        log = open(home / "service.log", "ab")  # noqa: SIM115 (the child keeps it)
        process = subprocess.Popen(
            [str(Path(sys.executable).with_name("negmerge")), "serve", "--port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        (home / "service.pid").write_text(str(process.pid))
        out.print(f"started the service (pid {process.pid}, log {home / 'service.log'})")
    else:
        out.print(f"the demo service is already running (pid {pid})")
    deadline = time.monotonic() + 180
    while True:
        try:
            with ServiceClient(url) as probe:
                probe.health()
            return url
        except ServiceError as exc:
            if running_pid(home) is None or time.monotonic() > deadline:
                tail = (home / "service.log").read_text(errors="replace")[-3000:]
                raise SystemExit(f"the service did not start; its log ends with:\n{tail}") from exc
            time.sleep(0.5)


def api_key(home: Path, env: dict[str, str]) -> str:
    """The demo tenant's admin key: created once, kept in home/api-key (mode 0600)."""
    key_file = home / "api-key"
    if key_file.exists():
        return key_file.read_text().strip()
    from app.db.session import Database
    from app.services.tenants import create_key, create_tenant

    database = Database(env["NEGMERGE_DATABASE_URL"], pool_size=1)
    try:
        with database.unit_of_work() as session:
            tenant = create_tenant(session, "demo", "make demo")
            _row, key = create_key(session, tenant, ["admin"], "demo", "make demo")
    finally:
        database.dispose()
    key_file.touch(mode=0o600)
    key_file.write_text(key + "\n")
    return key


def stop_service(home: Path, timeout: float = 60.0) -> None:
    """SIGTERM to `negmerge serve` alone (it stops its worker after the running step; a signal
    to the worker's pool processes too would kill them mid-way, and Celery logs that as an
    error), then wait until none of its processes is left."""
    pid = running_pid(home)
    if pid is None:
        out.print("no demo service is running")
        return
    os.kill(pid, signal.SIGTERM)
    with out.status(f"stopping the demo service (pid {pid}): the running step finishes first"):
        deadline = time.monotonic() + timeout
        while _group_alive(pid):
            if time.monotonic() > deadline:
                raise SystemExit(
                    f"the demo service (pid {pid}) is still stopping after {timeout:.0f} s; "
                    f"see {home / 'service.log'}, or kill it: kill -9 -- -{pid}"
                )
            time.sleep(0.2)
    (home / "service.pid").unlink(missing_ok=True)
    out.print(f"stopped the demo service (pid {pid})")


def _group_alive(pgid: int) -> bool:
    """Whether a process of the group `pgid` (the service and its worker) still runs; on
    Linux, zombies (ended, not yet reaped) do not count."""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        return True
    for stat in proc.glob("[0-9]*/stat"):
        try:
            # pid (comm) state ppid pgrp ...: comm may hold spaces, so split after it.
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # ended while we looked
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def with_fixture_notes(ensure):  # type: ignore[no-untyped-def]
    """`ensure()`, saying so while a fixture is being built (not when it is cached)."""
    from negmerge.fixtures import log as fixtures_log

    class Note(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            out.print(record.getMessage() + "...")

    note = Note(logging.INFO)
    fixtures_log.addHandler(note)
    fixtures_log.setLevel(logging.INFO)
    try:
        return ensure()
    finally:
        fixtures_log.removeHandler(note)


def find_or_create(existing, name: str, create):  # type: ignore[no-untyped-def]
    """The resource named `name` if an earlier demo run registered it, else a new one."""
    for item in existing:
        if item["name"] == name:
            return item
    return create()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--home", type=Path, default=Path("var/demo"))
    parser.add_argument("--stop", action="store_true", help="stop the demo service")
    args = parser.parse_args()
    home = args.home.resolve()

    if args.stop:
        stop_service(home)
        return

    from negmerge.fixtures import default_cache_dir, ensure_tiny_clip
    from negmerge.fixtures.jobs import DEMO_VARIANTS

    clip = with_fixture_notes(ensure_tiny_clip)
    home.mkdir(parents=True, exist_ok=True)
    env = service_env(home, [default_cache_dir()])  # never `home`: it holds the artifacts
    url = start_service(home, args.port, env)
    service = ServiceClient(url, api_key(home, env))

    model = find_or_create(
        service.list_models(),
        "tiny-clip",
        lambda: service.register_model(
            {
                "name": "tiny-clip",
                "description": "A tiny CLIP trained offline on digits and generated shapes",
                "family": "open_clip",
                "architecture": clip.model_name,
                "model_config_uri": str(clip.config_path),
                "weights_uri": str(clip.weights_path),
                "classes": [*clip.classes["digits"], *clip.classes["shapes"]],
                "templates": sorted({*clip.templates["digits"], *clip.templates["shapes"]}),
            }
        ),
    )
    datasets = {
        domain: find_or_create(
            service.list_datasets(),
            domain,
            lambda domain=domain: service.register_dataset(
                domain, str(clip.dataset_roots[domain] / "manifest.jsonl"), model_id=model["id"]
            ),
        )
        for domain in ("shapes", "digits")
    }
    job = service.submit_job(
        {
            "model": {"id": model["id"]},
            "forget": {"dataset_id": datasets["shapes"]["id"]},
            "retain": {"dataset_id": datasets["digits"]["id"]},
            "variants": DEMO_VARIANTS,
            "subject_reference": "DEMO-1",
            "legal_basis": "GDPR Art. 17",
            # Run again on the same service, the demo forgets the shapes once more on purpose
            # (otherwise the service refuses a forget set its lineage already forgot).
            "allow_repeat": True,
        }
    )
    out.print(f"submitted deletion request {job['id']}: forget the shapes, keep the digits")
    with JobProgress() as progress:
        job = service.wait_for_job(job["id"], on_update=progress.update, poll_interval=1.0)
    print_report(service.job_report(job["id"]), job)  # with the target and the verdict
    verdict = job.get("verdict") or {}
    if verdict and not verdict.get("met"):
        out.print(
            "[bold dark_orange]The job ran to the end but did not meet its target[/]: this "
            "deletion is not done (the model version it made, if any, is kept as evidence)."
        )

    base = service.base_url
    # soft_wrap: a long line is left to the terminal to wrap, never broken into two lines
    # (a command cut in two cannot be pasted).
    out.print(
        f"\n[bold]Dashboard[/bold]: {base}/dashboard (sign in with the key in {home / 'api-key'})"
        f"\n[bold]API docs[/bold]:  {base}/docs"
        f"\n[bold]CLI[/bold]:",
        soft_wrap=True,
    )
    out.print(
        f"  NEGMERGE_API_URL={base} NEGMERGE_API_KEY=$(cat {home / 'api-key'}) "
        f"{Path(sys.executable).with_name('negmerge-client')} jobs list",
        soft_wrap=True,
        highlight=False,
    )
    out.print("The service keeps running; stop it with [bold]make demo-stop[/bold].")
    if job["state"] != "SUCCEEDED":
        raise SystemExit(f"the job ended {job['state']}")


if __name__ == "__main__":
    main()
