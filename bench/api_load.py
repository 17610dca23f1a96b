"""GET /v1/unlearning-jobs/{id} under load, against a bare FastAPI route of the same server.

The target: at 64 concurrent clients, the job GET (what dashboards poll) answers at least
50% of the bare route's throughput, with p99 under 50 ms, so that polling costs the server
little more than the framework itself. The script, start to end:

  1. creates a fresh PostgreSQL database (negmerge_bench_<random> on 127.0.0.1:5432) and
     runs `alembic upgrade head` on it; creates a tenant and an API key (jobs:write,
     models:write);
  2. serves the production app (`create_app`, JSON access log at INFO, no reload) with uvicorn
     in a subprocess on a free 127.0.0.1 port, N worker processes; the app factory below adds
     one route, GET /bare, an `async def` returning a static job-shaped JSON of similar size,
     behind the same middleware, so that both targets are measured on the same server;
  3. registers a model and a data set and submits --jobs jobs (1) over HTTP (they stay QUEUED: no
     workers run; the broker is Redis on 127.0.0.1:6379 with a queue of its own);
  4. for each target: a warm-up, then a fixed duration at 64 keep-alive connections over
     loopback, with `wrk` (one thread) if it is installed, else an httpx.AsyncClient load
     generator in this process. The load generator shares the machine's cores with the
     server: the numbers are for that setup;
  5. prints requests/s and p50 / p95 / p99 latency side by side, the throughput ratio, and
     pass/fail; and, from the server itself (GET /bench/gc, same app), the full (generation 2)
     garbage collections during each target's run and their longest pause, and whether the
     server imported model code (timm, torchvision, open_clip) (registration once built the
     model in the API process, and every full collection then walked its objects); then
     stops the server and drops the database, also on errors.

Run:  .venv/bin/python bench/api_load.py [--workers 1 2] [--jobs 1] [--duration 10] [--markdown]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
POSTGRES_URL = os.environ.get(
    "NEGMERGE_BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("NEGMERGE_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
CLASSES = ["circle", "square", "triangle"]
CONNECTIONS = 64
TARGET_RATIO = 0.5
TARGET_P99_MS = 50.0
# Ours' p95 at most this many times the bare route's: a longer tail is the server stalling
# (full garbage collections walking model code), not the route's own work.
TARGET_P95_VS_BARE = 2.5
MODEL_CODE = ("timm", "torchvision", "open_clip")

# What GET /bare answers: the shape and about the size of a queued job's JSON (~1 KB).
_JOB_ID = "0190f1c4-6b8e-7d3a-9f2e-4c1b2a3d4e5f"
BARE_BODY = {
    "id": _JOB_ID,
    "state": "QUEUED",
    "stage": None,
    "progress": {"variants_done": 0, "variants_total": 4, "lambdas_evaluated": 0, "percent": 0},
    "model": {"id": "0190f1c4-6b8e-7d3a-9f2e-000000000001", "version": 1},
    "forget": {
        "dataset_id": "0190f1c4-6b8e-7d3a-9f2e-000000000002",
        "count": 2,
        "manifest_sha256": "3f" * 32,
    },
    "subject_reference": "DSR-1",
    "legal_basis": "GDPR Art. 17",
    "created_at": "2025-01-01T12:00:00.000000Z",
    "updated_at": "2025-01-01T12:00:00.000000Z",
    "started_at": None,
    "finished_at": None,
    "cancel_requested_at": None,
    "error": None,
    "result": None,
    "links": {
        "self": f"/v1/unlearning-jobs/{_JOB_ID}",
        "report": f"/v1/unlearning-jobs/{_JOB_ID}/report",
        "cancel": f"/v1/unlearning-jobs/{_JOB_ID}:cancel",
    },
}


def _nodelay_for_inherited_sockets() -> None:
    """Work around uvicorn's `--workers N` losing TCP_NODELAY (Kludex/uvicorn#3149): the
    supervisor binds the listener with proto 0, accepted sockets inherit it, and asyncio only
    sets TCP_NODELAY when proto is IPPROTO_TCP; Nagle then meets the client's delayed ACK and
    every keep-alive request waits ~40 ms. A no-op with one worker (asyncio already sets it)."""
    import asyncio.base_events

    def set_nodelay(sock: socket.socket) -> None:
        if sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    asyncio.base_events._set_nodelay = set_nodelay  # type: ignore[attr-defined]


class FullCollections:
    """The server's generation-2 garbage collections since the last reading (gc.callbacks)."""

    def __init__(self) -> None:
        self.count, self.longest_ms, self._began = 0, 0.0, 0.0

    def __call__(self, phase: str, info: dict) -> None:
        if info["generation"] != 2:
            return
        if phase == "start":
            self._began = time.perf_counter()
            return
        self.count += 1
        self.longest_ms = max(self.longest_ms, (time.perf_counter() - self._began) * 1e3)

    def read_and_reset(self) -> dict:
        reading = {"full_collections": self.count, "longest_pause_ms": self.longest_ms}
        self.count, self.longest_ms = 0, 0.0
        return reading


def bench_app():  # type: ignore[no-untyped-def]
    """The server's app factory: the production app (settings from NEGMERGE_*, JSON logs) plus
    GET /bare and GET /bench/gc. `uvicorn --factory --app-dir bench api_load:bench_app`."""
    import gc

    from app.main import create_app
    from app.observability import configure_logging
    from app.settings import get_settings

    _nodelay_for_inherited_sockets()
    settings = get_settings()
    configure_logging(settings.log_level)
    app = create_app(settings)

    @app.get("/bare", include_in_schema=False)
    async def bare() -> dict:
        return BARE_BODY

    collections = FullCollections()
    gc.callbacks.append(collections)

    @app.get("/bench/gc", include_in_schema=False)
    async def garbage_collections() -> dict:
        """The full collections since the last call, and the model code imported so far."""
        imported = [name for name in MODEL_CODE if name in sys.modules]
        return {**collections.read_and_reset(), "model_code": imported}

    return app


# ---- setup: database, data, server ------------------------------------------------------------


def create_database() -> tuple[str, str]:
    """A new database, migrated to head; returns (its name, its URL)."""
    from alembic import command
    from alembic.config import Config
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    name = f"negmerge_bench_{secrets.token_hex(4)}"
    admin = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
    finally:
        admin.dispose()
    url = make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)
    config = Config(str(ROOT / "alembic.ini"))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    config.attributes["configure_logger"] = False
    command.upgrade(config, "head")
    return name, url


def drop_database(name: str) -> None:
    from sqlalchemy import create_engine, text

    admin = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


def create_api_key(url: str) -> str:
    """A tenant and a key that can register models and data sets and submit and read jobs."""
    from app.db.session import Database
    from app.services.tenants import create_key, create_tenant

    database = Database(url, pool_size=1)
    try:
        with database.unit_of_work() as session:
            tenant = create_tenant(session, "bench", "bench")
            scopes = ["jobs:write", "models:write"]  # jobs:write implies jobs:read
            _row, key = create_key(session, tenant, scopes, "bench", "bench")
        return key
    finally:
        database.dispose()


def write_data(root: Path) -> tuple[Path, Path]:
    """A tiny classifier's weights and a 3-class image data set; returns both paths."""
    import timm
    from PIL import Image

    from negmerge.io import save_file

    weights = root / "weights" / "base.safetensors"
    weights.parent.mkdir(parents=True)
    save_file(timm.create_model("test_resnet", num_classes=len(CLASSES)).state_dict(), weights)
    rows = []
    for c, label in enumerate(CLASSES):
        for i in range(6):
            split = "val" if i == 4 else "test" if i == 5 else "train"
            row = {"id": f"{label}-{i}", "path": f"{label}/{i}.png", "label": label, "split": split}
            (root / "shapes" / label).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8), (40 * c, 10 * i, 100)).save(root / "shapes" / row["path"])
            rows.append(row)
    manifest = root / "shapes" / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return weights, manifest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_tree_cpu(pid: int) -> dict[int, float] | None:
    """CPU seconds (user + system) used so far by `pid` and each of its descendants, by pid
    (Linux /proc); None where /proc is not there."""
    used, todo = {}, [pid]
    try:
        tick = os.sysconf("SC_CLK_TCK")
        while todo:
            current = todo.pop()
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            used[current] = (int(fields[11]) + int(fields[12])) / tick
            for task in Path(f"/proc/{current}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
    except (OSError, ValueError):
        return None
    return used


def cpu_split(before: dict[int, float], after: dict[int, float]) -> str:
    """How the server's CPU time was shared between its busy processes, largest first, e.g.
    "51/49": with several uvicorn workers, one that accepted most of the connections does
    most of the work."""
    used = [after[pid] - before.get(pid, 0.0) for pid in after]
    total = sum(used) or 1.0
    shares = [100 * u / total for u in sorted(used, reverse=True)]
    return "/".join(f"{share:.0f}" for share in shares if share > 2)


class Server:
    """uvicorn serving bench_app in a subprocess (its own process group)."""

    def __init__(self, env: dict[str, str], workers: int, log: Path) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = log
        command = [
            sys.executable, "-m", "uvicorn", "api_load:bench_app", "--factory",
            "--app-dir", str(ROOT / "bench"), "--host", "127.0.0.1", "--port", str(self.port),
            "--workers", str(workers), "--no-access-log", "--log-level", "warning",
        ]  # fmt: skip
        # The app writes one JSON access line per request itself; uvicorn's would duplicate it.
        with open(log, "ab") as out:
            self.process = subprocess.Popen(
                command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip

    def wait_ready(self, timeout: float = 60.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited ({self.process.returncode}): {self.tail()}")
            try:
                if httpx.get(f"{self.base}/bare", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"the server did not answer within {timeout:.0f} s: {self.tail()}")

    def tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # graceful: uvicorn stops its workers
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        with contextlib.suppress(ProcessLookupError):  # workers left behind in the group
            os.killpg(self.process.pid, signal.SIGKILL)


def submit_jobs(
    base: str, headers: dict[str, str], weights: Path, manifest: Path, count: int
) -> list[str]:
    """Registers the model and the data set and submits `count` jobs; returns their URL paths."""
    import httpx

    with httpx.Client(base_url=base, headers=headers, timeout=30.0) as client:
        model = client.post(
            "/v1/models",
            json={
                "name": "bench-net",
                "family": "classifier",
                "architecture": "test_resnet",
                "classes": CLASSES,
                "weights_uri": str(weights),
                "image_size": 32,
            },
        )
        model.raise_for_status()
        body = {"name": "shapes", "manifest_uri": str(manifest)}
        dataset = client.post("/v1/datasets", json=body)
        dataset.raise_for_status()
        paths = []
        for number in range(1, count + 1):
            job = client.post(
                "/v1/unlearning-jobs",
                json={
                    "model": {"id": model.json()["id"]},
                    "forget": {"dataset_id": dataset.json()["id"], "ids": ["circle-0", "circle-1"]},
                    "variants": {"preset": "tiny-classifier"},
                    "subject_reference": f"DSR-{number}",
                    "legal_basis": "GDPR Art. 17",
                },
            )
            job.raise_for_status()
            path = job.headers["Location"]
            check = client.get(path)
            check.raise_for_status()
            if check.json()["state"] != "QUEUED" or "Retry-After" not in check.headers:
                raise RuntimeError(f"unexpected job: {check.status_code} {check.text}")
            paths.append(path)
        return paths


# ---- load generation ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Result:
    target: str
    workers: int
    requests: int
    seconds: float
    failed: int  # connection errors, timeouts and non-2xx answers
    p50_ms: float
    p95_ms: float
    p99_ms: float
    body_bytes: int
    cpu_ms: float | None  # the server's CPU time (all its processes) per request
    cpu_split: str  # its share per process, in %, largest first
    full_collections: int  # the server's generation-2 garbage collections during the run
    longest_pause_ms: float  # the longest of them
    model_code: list[str]  # timm, torchvision, open_clip: those the server had imported

    @property
    def rps(self) -> float:
        return self.requests / self.seconds


WRK_SCRIPT = """
local paths = {PATHS}
local next_path = 0
request = function()
  next_path = next_path % #paths + 1
  return wrk.format(nil, paths[next_path])
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '\\nRESULT {"requests": %d, "us": %d, "errors": %d, "non2xx": %d, '
    .. '"p50": %d, "p95": %d, "p99": %d}\\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(95), latency:percentile(99)))
end
"""


def run_wrk(
    base: str, paths: list[str], headers: dict[str, str], seconds: float, tmp: Path
) -> dict:
    """wrk, each connection asking for `paths` in turn."""
    script = tmp / "load.lua"
    script.write_text(WRK_SCRIPT.replace("PATHS", ", ".join(json.dumps(path) for path in paths)))
    command = ["wrk", "-t1", f"-c{CONNECTIONS}", f"-d{max(1, round(seconds))}s", "--timeout", "10s"]
    for name, value in headers.items():
        command += ["-H", f"{name}: {value}"]
    command += ["-s", str(script), base + paths[0]]
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60)
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stdout}{done.stderr}")
    raw = json.loads(line.removeprefix("RESULT "))
    return {
        "requests": raw["requests"],
        "seconds": raw["us"] / 1e6,
        "failed": raw["errors"] + raw["non2xx"],
        "latencies_ms": [raw["p50"] / 1e3, raw["p95"] / 1e3, raw["p99"] / 1e3],
    }


async def _httpx_load(base: str, paths: list[str], headers: dict[str, str], seconds: float) -> dict:
    import httpx

    limits = httpx.Limits(max_connections=CONNECTIONS, max_keepalive_connections=CONNECTIONS)
    latencies: list[float] = []
    failed = 0
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=10.0) as client:
        began = time.perf_counter()
        deadline = began + seconds

        async def one_client() -> None:
            nonlocal failed
            while time.perf_counter() < deadline:
                start = time.perf_counter()
                try:
                    answer = await client.get(base + paths[len(latencies) % len(paths)])
                    ok = answer.is_success
                except httpx.HTTPError:
                    ok = False
                latencies.append((time.perf_counter() - start) * 1e3)
                failed += not ok

        await asyncio.gather(*(one_client() for _ in range(CONNECTIONS)))
        elapsed = time.perf_counter() - began
    latencies.sort()

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else 0.0

    return {
        "requests": len(latencies),
        "seconds": elapsed,
        "failed": failed,
        "latencies_ms": [pct(0.50), pct(0.95), pct(0.99)],
    }


def run_httpx(
    base: str, paths: list[str], headers: dict[str, str], seconds: float, _tmp: Path
) -> dict:
    return asyncio.run(_httpx_load(base, paths, headers, seconds))


def measure(args: argparse.Namespace, server: Server, job_paths: list[str], key: str, tmp: Path):  # type: ignore[no-untyped-def]
    import httpx

    load = run_wrk if args.client == "wrk" else run_httpx
    auth = {"Authorization": f"Bearer {key}"}
    targets = [("bare: GET /bare", ["/bare"], {}),
               ("ours: GET /v1/unlearning-jobs/{id}", job_paths, auth)]  # fmt: skip
    results = []
    for label, paths, headers in targets:
        size = len(httpx.get(server.base + paths[0], headers=headers).content)
        load(server.base, paths, headers, args.warmup, tmp)
        httpx.get(server.base + "/bench/gc").raise_for_status()  # counts from here on
        cpu_before = process_tree_cpu(server.process.pid)
        raw = load(server.base, paths, headers, args.duration, tmp)
        cpu_after = process_tree_cpu(server.process.pid)
        collections = httpx.get(server.base + "/bench/gc").json()
        cpu_ms, split = None, "n/a"
        if cpu_before is not None and cpu_after is not None and raw["requests"]:
            cpu_ms = (sum(cpu_after.values()) - sum(cpu_before.values())) * 1e3 / raw["requests"]
            split = cpu_split(cpu_before, cpu_after)
        p50, p95, p99 = raw["latencies_ms"]
        results.append(
            Result(label, args.current_workers, raw["requests"], raw["seconds"], raw["failed"],
                   p50, p95, p99, size, cpu_ms, split, collections["full_collections"],
                   collections["longest_pause_ms"], collections["model_code"])
        )  # fmt: skip
    return results


# ---- report ------------------------------------------------------------------------------------


def rows(results: list[Result]) -> list[list[str]]:
    out = []
    for bare, ours in zip(results[::2], results[1::2], strict=True):
        ratio = ours.rps / bare.rps
        p95_vs_bare = ours.p95_ms / bare.p95_ms if bare.p95_ms else float("inf")
        checks = (
            f"{'PASS' if ratio >= TARGET_RATIO else 'FAIL'}",
            f"{'PASS' if ours.p99_ms < TARGET_P99_MS else 'FAIL'}",
            f"{p95_vs_bare:.1f}x {'PASS' if p95_vs_bare <= TARGET_P95_VS_BARE else 'FAIL'}",
        )
        for r, is_ours in ((bare, False), (ours, True)):
            cpu = "n/a" if r.cpu_ms is None else f"{r.cpu_ms:.2f}"
            out.append([
                r.target, str(r.workers), f"{r.rps:,.0f}", f"{r.p50_ms:.1f}", f"{r.p95_ms:.1f}",
                f"{r.p99_ms:.1f}", cpu, r.cpu_split, str(r.body_bytes), str(r.failed),
                f"{r.full_collections} / {r.longest_pause_ms:.0f}",
                f"{ratio:.0%}" if is_ours else "", *(checks if is_ours else ("", "", "")),
            ])  # fmt: skip
    return out


HEADER = ["target", "workers", "req/s", "p50 ms", "p95 ms", "p99 ms", "server CPU ms/req",
          "CPU split %", "body B", "failed", "full GCs / longest ms", "ours / bare",
          f"ratio >= {TARGET_RATIO:.0%}", f"p99 < {TARGET_P99_MS:g} ms",
          f"p95 <= {TARGET_P95_VS_BARE:g}x bare"]  # fmt: skip


def print_table(results: list[Result], args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    title = (
        f"{CONNECTIONS} concurrent keep-alive clients over 127.0.0.1, {args.duration:g} s per "
        f"target after {args.warmup:g} s warm-up, {args.jobs} job(s) polled; "
        f"client: {args.client}; "
        f"{os.cpu_count()} CPU cores shared by the server and the load generator"
    )
    table = Table(title=title)
    for i, name in enumerate(HEADER):
        table.add_column(name, justify="left" if i == 0 else "right")
    for row in rows(results):
        table.add_row(*row)
    Console(width=max(140, shutil.get_terminal_size().columns)).print(table)
    imported = sorted({name for r in results for name in r.model_code})
    model_code = ", ".join(imported) if imported else "none"
    print(f"Model code imported by the server after registering the model: {model_code}")
    if args.markdown:
        print(f"\n{title}\n")
        print("| " + " | ".join(HEADER) + " |")
        print("|" + "|".join("---" if i == 0 else "---:" for i in range(len(HEADER))) + "|")
        for row in rows(results):
            print("| " + " | ".join(row) + " |")
        print(f"\nModel code imported by the server after registering the model: {model_code}")


# ---- main --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    global CONNECTIONS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1],
                        help="uvicorn worker processes; several: one server each")  # fmt: skip
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per target")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of warm-up per target")
    parser.add_argument("--client", choices=["auto", "wrk", "httpx"], default="auto",
                        help="load generator (auto: wrk if installed, else httpx)")  # fmt: skip
    parser.add_argument("--connections", type=int, default=CONNECTIONS,
                        help="concurrent clients (the target is stated for 64)")  # fmt: skip
    parser.add_argument("--jobs", type=int, default=1,
                        help="jobs polled; each client asks for them in turn")  # fmt: skip
    parser.add_argument("--markdown", action="store_true", help="also print a Markdown table")
    args = parser.parse_args(argv)
    CONNECTIONS = args.connections
    if args.client == "auto":
        args.client = "wrk" if shutil.which("wrk") else "httpx"
    sys.path.insert(0, str(ROOT))

    tmp = Path(tempfile.mkdtemp(prefix="negmerge-bench-"))
    queue = f"negmerge-bench-{secrets.token_hex(4)}"
    name = None
    results: list[Result] = []
    try:
        name, url = create_database()
        key = create_api_key(url)
        weights, manifest = write_data(tmp / "data")
        env = {
            **os.environ,
            "NEGMERGE_DATABASE_URL": url,
            "NEGMERGE_BROKER_URL": REDIS_URL,
            "NEGMERGE_QUEUE_NAME": queue,
            "NEGMERGE_ARTIFACT_ROOT": str(tmp / "artifacts"),
            "NEGMERGE_BROKER_FOLDER": str(tmp / "broker"),
            "NEGMERGE_DATA_ROOTS": json.dumps([str(tmp / "data")]),
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        }
        job_paths = None
        for workers in args.workers:
            server = Server(env, workers, tmp / f"server-{workers}.log")
            try:
                server.wait_ready()
                if job_paths is None:
                    auth = {"Authorization": f"Bearer {key}"}
                    job_paths = submit_jobs(server.base, auth, weights, manifest, args.jobs)
                args.current_workers = workers
                results += measure(args, server, job_paths, key, tmp)
            finally:
                server.stop()
    finally:
        if name is not None:
            drop_database(name)
        try:
            import redis

            redis.Redis.from_url(REDIS_URL).delete(
                queue, f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}"
            )
        except Exception as exc:  # the broker's leftovers are not worth failing the run for
            print(f"warning: could not clean the Redis queue {queue}: {exc}", file=sys.stderr)
        shutil.rmtree(tmp, ignore_errors=True)
    print_table(results, args)
    return 1 if any(r.failed for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
