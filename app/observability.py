"""JSON logs with request ids, Prometheus metrics, and the middleware that feeds both."""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
import uuid
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from starlette.types import ASGIApp, Message, Receive, Scope, Send

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "request_id", default=None
)

# Process-wide metrics (also fed by the job state machine, which runs in workers too).
REGISTRY = CollectorRegistry(auto_describe=True)
HTTP_REQUESTS = Counter(
    "negmerge_http_requests_total",
    "HTTP requests answered.",
    ["method", "route", "status"],
    registry=REGISTRY,
)
HTTP_LATENCY = Histogram(
    "negmerge_http_request_seconds",
    "Time to answer an HTTP request.",
    ["method", "route"],
    registry=REGISTRY,
    buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
STAGE_SECONDS = Histogram(
    "negmerge_job_stage_seconds",
    "Time unlearning jobs spent in each stage.",
    ["stage"],
    registry=REGISTRY,
    buckets=(1, 5, 15, 60, 300, 900, 1800, 3600, 7200, 21600),
)


class JobsByState:
    """A collector that counts jobs per state in the database at scrape time."""

    def __init__(self, count: Callable[[], dict[str, int]]) -> None:
        self._count = count

    def collect(self):  # type: ignore[no-untyped-def]
        from app.db.models import JobState

        family = GaugeMetricFamily(
            "negmerge_jobs", "Unlearning jobs by state (all tenants).", labels=["state"]
        )
        counts = self._count()
        for state in JobState:
            family.add_metric([state.value], counts.get(state.value, 0))
        yield family

    def describe(self):  # type: ignore[no-untyped-def]
        return []


class FineTuningThroughput:
    """A collector of the fine-tuning jobs' training images per second, read from the
    database at scrape time (the workers write each job's latest rate there)."""

    def __init__(self, throughput: Callable[[], float]) -> None:
        self._throughput = throughput

    def collect(self):  # type: ignore[no-untyped-def]
        yield GaugeMetricFamily(
            "negmerge_finetune_images_per_second",
            "Training images per second of the jobs fine-tuning now (each one's latest step, "
            "data loading included), summed.",
            value=self._throughput(),
        )

    def describe(self):  # type: ignore[no-untyped-def]
        return []


class FineTuningDeviceUsage:
    """A collector of the accelerator use of the jobs fine-tuning now, read from the database
    at scrape time (the workers write each job's latest step's negmerge.finetune.device_usage
    there; CPU runs write none): memory summed over the jobs, utilisation averaged over those
    whose worker could read it (NVML), absent when none could."""

    def __init__(self, usages: Callable[[], list[dict[str, float]]]) -> None:
        self._usages = usages

    def collect(self):  # type: ignore[no-untyped-def]
        usages = self._usages()
        yield GaugeMetricFamily(
            "negmerge_finetune_device_jobs",
            "Jobs fine-tuning now on an accelerator (those that reported its use).",
            value=len(usages),
        )
        for name, key, what in [
            ("allocated", "memory_allocated_mib", "allocated at their latest step"),
            ("peak", "memory_peak_mib", "at peak in the running variant's process"),
        ]:
            yield GaugeMetricFamily(
                f"negmerge_finetune_device_memory_{name}_mib",
                f"Accelerator memory (MiB) of the jobs fine-tuning now, {what}, summed.",
                value=sum(u.get(key, 0.0) for u in usages),
            )
        utilisation = [u["utilization_percent"] for u in usages if "utilization_percent" in u]
        family = GaugeMetricFamily(
            "negmerge_finetune_device_utilization_percent",
            "GPU utilisation (percent) at the latest step of the jobs fine-tuning now, "
            "averaged over those whose worker reads it (pynvml installed); no sample if none.",
        )
        if utilisation:
            family.add_metric([], sum(utilisation) / len(utilisation))
        yield family

    def describe(self):  # type: ignore[no-untyped-def]
        return []


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with the request id of the request being served."""

    _SKIP = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if (request_id := request_id_var.get()) is not None:
            entry["request_id"] = request_id
        entry.update({k: v for k, v in record.__dict__.items() if k not in self._SKIP})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str = "INFO") -> None:
    """JSON lines on stderr for the service's loggers."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    logging.Formatter.converter = time.gmtime
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


access_log = logging.getLogger("app.access")


class RequestContextMiddleware:
    """Gives every request an id (X-Request-ID, taken from the client if it sent a sane one),
    logs one access line, and counts the request in the metrics by its route template."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        ok = 0 < len(incoming) <= 64 and incoming.replace("-", "").isalnum()
        request_id = incoming if ok else uuid.uuid4().hex
        token = request_id_var.set(request_id)
        began = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [
                    *message.get("headers", []),
                    (b"x-request-id", request_id.encode()),
                ]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            seconds = time.perf_counter() - began
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            HTTP_REQUESTS.labels(scope["method"], route, str(status)).inc()
            HTTP_LATENCY.labels(scope["method"], route).observe(seconds)
            access_log.info(
                "request",
                extra={
                    "method": scope["method"],
                    "path": scope["path"],
                    "route": route,
                    "status": status,
                    "ms": round(seconds * 1000, 2),
                },
            )
            request_id_var.reset(token)
