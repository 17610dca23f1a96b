"""Every setting of the service, in one object read from NEGMERGE_* environment variables.

The defaults are the embedded one-machine setup: SQLite and Celery's filesystem transport
under ./var. Production sets NEGMERGE_DATABASE_URL (PostgreSQL) and NEGMERGE_BROKER_URL (Redis).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

MiB = 1024 * 1024


def _var(*parts: str) -> str:
    return str(Path.cwd().joinpath("var", *parts))


class Settings(BaseSettings):
    """The service's configuration; NEGMERGE_<NAME> sets <name>."""

    model_config = SettingsConfigDict(env_prefix="NEGMERGE_", extra="ignore")

    database_url: str = Field(
        default_factory=lambda: f"sqlite:///{_var('negmerge.db')}",
        description="SQLAlchemy URL: sqlite:///... or postgresql+psycopg://...",
    )
    db_pool_size: int = Field(10, gt=0, description="Connections kept per process (PostgreSQL).")
    db_read_pool_size: int = Field(
        4,
        gt=0,
        description="Connections per process for job status reads (PostgreSQL); reads that "
        "find them busy wait and are answered together, one query per batch.",
    )
    broker_url: str = Field(
        "filesystem://", description="Celery broker: redis://... in production."
    )
    broker_folder: str = Field(
        default_factory=lambda: _var("broker"), description="filesystem:// broker's folder."
    )
    queue_name: str = Field("negmerge", description="Celery queue the job steps are sent to.")
    gpu_queue_name: str = Field(
        "gpu", description="Celery queue of the fine-tuning steps (one worker process per GPU)."
    )
    visibility_timeout_seconds: int = Field(
        6 * 3600,
        gt=0,
        description="Redis redelivers a message not acknowledged within this time; it must be "
        "longer than the longest step (messages are acknowledged when the step ends).",
    )
    step_lease_seconds: float = Field(
        120.0,
        gt=0,
        description="A running step's lease, renewed every quarter of it; a step whose lease "
        "has expired (its worker died) is sent again by the watchdog.",
    )
    step_max_attempts: int = Field(
        3, gt=0, description="Starts of one step before the job is FAILED."
    )
    resend_after_seconds: float = Field(
        300.0,
        gt=0,
        description="The watchdog sends a waiting step (or a QUEUED job's first step) again "
        "when its message was sent this long ago: a message may have been lost.",
    )
    watchdog_interval_seconds: float = Field(10.0, gt=0, description="Watchdog period.")
    progress_interval_seconds: float = Field(
        1.0, gt=0, description="Least time between two progress writes (current loss)."
    )
    artifact_root: str = Field(
        default_factory=lambda: _var("artifacts"),
        description="Where uploaded data sets and job outputs are stored (a path or fsspec URI).",
    )
    data_roots: list[str] = Field(
        default_factory=lambda: [_var()],
        description="Registered weights and manifests must lie under one of these paths/URIs, "
        "so that a tenant cannot make the server read arbitrary files.",
    )
    weights_check_timeout_seconds: float = Field(
        30.0,
        gt=0,
        description="Registration checks that the weights fit the architecture in a child "
        "process (forked from a server with the model libraries loaded, started by the first "
        "registration); past this time the child is killed and the registration refused.",
    )
    weights_check_memory_mib: int = Field(
        512,
        gt=0,
        description="How much the weights check's child process may grow beyond the model "
        "libraries it starts with (Linux).",
    )

    max_body_bytes: int = Field(1 * MiB, gt=0, description="Largest JSON request body.")
    max_upload_bytes: int = Field(512 * MiB, gt=0, description="Largest data set archive.")
    max_extracted_bytes: int = Field(2048 * MiB, gt=0, description="Largest unpacked archive.")
    max_archive_members: int = Field(200_000, gt=0, description="Most files in an archive.")
    max_compression_ratio: float = Field(
        100.0, gt=1, description="Refuse archive members that expand more than this (bombs)."
    )
    max_dataset_samples: int = Field(200_000, gt=0, description="Most samples in a data set.")
    max_variants: int = Field(64, gt=0, description="Most fine-tuning variants in one job.")

    page_size_default: int = Field(50, gt=0)
    page_size_max: int = Field(200, gt=0)
    retry_after_seconds: int = Field(5, gt=0, description="Retry-After on unfinished jobs.")
    log_level: str = "INFO"

    events_poll_seconds: float = Field(
        1.0, gt=0, description="How often a job's event stream (SSE) looks for new events."
    )
    events_heartbeat_seconds: float = Field(
        15.0,
        gt=0,
        description="A comment is sent on an idle event stream this often, so that proxies "
        "keep the connection open.",
    )
    events_max_stream_seconds: float = Field(
        3600.0,
        gt=0,
        description="An event stream is closed after this long even if the job goes on; "
        "clients reconnect with Last-Event-ID and miss nothing.",
    )
    webhook_allow_private: bool = Field(
        False,
        description="Allow webhook URLs whose host resolves to a private, loopback, "
        "link-local or otherwise non-public address (for tests and closed networks only).",
    )
    webhook_timeout_seconds: float = Field(
        10.0, gt=0, description="Timeout of one webhook delivery attempt (connect and read)."
    )
    webhook_max_attempts: int = Field(
        10, gt=0, description="Attempts of one webhook delivery before it is given up."
    )
    webhook_retry_base_seconds: float = Field(
        30.0,
        ge=0,
        description="Wait after the first failed attempt; it doubles after each further one.",
    )
    webhook_retry_max_seconds: float = Field(
        6 * 3600.0, ge=0, description="The longest wait between two attempts."
    )
    webhook_batch_size: int = Field(
        20, gt=0, description="Most webhook attempts one watchdog pass makes."
    )
    webhook_secret_grace_seconds: float = Field(
        24 * 3600.0,
        ge=0,
        description="After the tenant's signing secret is rotated, deliveries are signed with "
        "the old secret too for this long, so receivers can switch over.",
    )


@lru_cache
def get_settings() -> Settings:
    """The settings of this process, read once from the environment."""
    return Settings()
