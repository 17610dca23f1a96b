"""Every setting of the service, in one object read from NEGMERGE_* environment variables.

The defaults are the embedded one-machine setup: SQLite and Celery's filesystem transport
under ./var. Production sets NEGMERGE_DATABASE_URL (PostgreSQL) and NEGMERGE_BROKER_URL (Redis).
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MiB = 1024 * 1024
TENANT = "{tenant}"  # in a data root: the calling tenant's id (a folder per tenant)


def _var(*parts: str) -> str:
    return str(Path.cwd().joinpath("var", *parts))


class TenantQuota(BaseModel):
    """One tenant's quotas; a field left out is the global setting's."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    active_jobs: int | None = Field(None, gt=0)
    compute_seconds_per_day: float | None = Field(None, gt=0)
    stored_bytes: int | None = Field(None, gt=0)


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
    finetune_loader_workers: Annotated[int, Field(ge=0, le=64)] | Literal["auto"] = Field(
        "auto",
        description="Loader processes per fine-tuning run (0: load in the run's own process). "
        "auto: min(cores - 1, 8) on CUDA, 0 on CPU. Any number gives the same task vector.",
    )
    finetune_decoded_cache_mib: int = Field(
        1024,
        ge=0,
        description="Most MiB of a job's forget set kept decoded at the model's input size, "
        "in memory and as a file in the job's work directory (deleted once the variants are "
        "merged); 0 decodes every image every epoch. The same task vector either way.",
    )
    finetune_channels_last: bool = Field(
        True, description="On CUDA, feed batches in channels-last memory format."
    )
    finetune_compile: bool = Field(
        False, description="Run the fine-tuning forward through torch.compile (CUDA mostly)."
    )
    worker_variants_per_device: Annotated[int, Field(ge=1, le=64)] | Literal["auto"] = Field(
        "auto",
        description="Variants a worker fine-tunes at once (its processes; Celery's "
        "--concurrency overrides it). Run one worker per GPU with only that GPU visible: more "
        "than 1 shares the GPU between variants when one does not fill it. auto: 1 (a variant "
        "with its loader workers, or its threads on CPU, uses the device).",
    )
    worker_torch_threads: Annotated[int, Field(ge=1, le=1024)] | Literal["auto"] = Field(
        "auto",
        description="torch CPU threads in each of a worker's processes. auto: the cores "
        "divided among the worker's processes (OMP_NUM_THREADS, where set, is left to torch).",
    )
    merge_storage: Literal["running", "task-vectors"] = Field(
        "running",
        description="running: each worker folds the variants it fine-tunes into a running "
        "merge state of its own (NegMerge: about 1.06x the model) and the task vectors are not "
        "stored, so a job's storage is about (workers + 1) x the model whatever n is; "
        "task-vectors: store every task vector until the merge (n x the model). Methods "
        "whose result depends on the order or on every task vector at once (magmax, ties, "
        "single) always store task vectors.",
    )
    artifact_root: str = Field(
        default_factory=lambda: _var("artifacts"),
        description="Where uploaded data sets and job outputs are stored (a path or fsspec URI).",
    )
    artifact_s3_endpoint_url: str | None = Field(
        None,
        description="An s3:// artifact root's endpoint (e.g. http://seaweedfs:8333 for an "
        "S3-compatible store); unset: AWS's.",
    )
    artifact_s3_access_key_id: str | None = Field(
        None, description="Access key of an s3:// artifact root (unset: the AWS_* environment)."
    )
    artifact_s3_secret_access_key: SecretStr | None = Field(
        None, description="Secret key of an s3:// artifact root."
    )
    artifact_s3_region: str | None = Field(None, description="Region of an s3:// artifact root.")
    weights_download_redirect: bool = Field(
        False,
        description="With an s3:// artifact root, a weights download answers 307 with a "
        "presigned URL of the object instead of streaming it through the API.",
    )
    weights_redirect_expiry_seconds: int = Field(
        900, gt=0, description="How long a presigned weights URL stays valid."
    )
    version_delta_max_depth: int = Field(
        4,
        ge=0,
        le=64,
        description="A model version made by a job is stored as its parent plus a sparse "
        "delta when that is smaller, in chains of at most this many deltas on a dense "
        "version (deeper: stored dense again); 0 stores every version dense.",
    )
    report_signing_key_file: str = Field(
        default_factory=lambda: _var("report-signing-key.pem"),
        description="The Ed25519 private key (PEM) that signs evidence reports; generated "
        "here (mode 0600) on first use if missing. Every API process must read the same "
        "file; its public key is GET /v1/report-signing-key.",
    )
    scratch_root: str = Field(
        default_factory=lambda: _var("scratch"),
        description="With an object store as artifact root: the local folder where a worker "
        "stages one step's inputs and outputs (and the API unpacks uploads); emptied after "
        "each step.",
    )
    scratch_max_bytes: int = Field(
        64 * 1024 * MiB,
        gt=0,
        description="Most bytes one step may stage into the scratch folder; a step whose "
        "inputs need more fails with a message naming this setting.",
    )
    data_roots: list[str] = Field(
        default_factory=lambda: [_var("data")],
        description="Registered weights and manifests must lie under one of these paths/URIs, "
        "so that a tenant cannot make the server read arbitrary files. `{tenant}` in one "
        "(a whole path segment) is the calling tenant's id: a folder per tenant. None may "
        "overlap the artifact root, the broker folder or the SQLite file (refused at start).",
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
    max_decompressor_memory_bytes: int = Field(
        128 * MiB,
        gt=0,
        description="Most memory an archive's decompressor may ask for (the xz/lzma "
        "dictionary; xz -9 needs 64 MiB): archives that need more are refused.",
    )
    max_image_pixels: int = Field(
        25_000_000,
        gt=0,
        description="Largest image (width x height) a data set may hold, checked from the "
        "image's header before it is decoded.",
    )
    max_concurrent_uploads: int = Field(
        2,
        gt=0,
        description="Uploads one tenant may have being unpacked and checked at once; more "
        "are answered 429 (across API processes on PostgreSQL, per process on SQLite).",
    )
    upload_retry_after_seconds: int = Field(
        10, gt=0, description="Retry-After on an upload refused for the concurrent limit."
    )
    max_manifest_bytes: int = Field(
        64 * MiB,
        gt=0,
        description="Largest manifest file in an uploaded archive (it is parsed in memory).",
    )
    max_dataset_samples: int = Field(200_000, gt=0, description="Most samples in a data set.")
    max_variants: int = Field(64, gt=0, description="Most fine-tuning variants in one job.")
    max_epochs: int = Field(100, gt=0, description="Most epochs of one variant.")
    max_steps: int = Field(100_000, gt=0, description="Most optimizer steps of one variant.")
    max_warmup_steps: int = Field(10_000, ge=0, description="Most warmup steps of one variant.")
    max_batch_size: int = Field(1024, gt=0, description="Largest fine-tuning batch.")
    max_augment_layers: int = Field(
        10, gt=0, description="Most RandAugment operations per image (the n of rand-m9-n2)."
    )
    max_total_steps: int = Field(
        1_000_000,
        gt=0,
        description="Most optimizer steps of all a job's variants together (steps, or epochs "
        "x batches of the forget set): the job's fine-tuning work.",
    )
    max_lambda_grid_points: int = Field(1000, gt=0, description="Most lambdas in a search grid.")
    max_lambda: float = Field(
        10.0, gt=0, allow_inf_nan=False, description="Largest lambda a search grid may hold."
    )
    max_eval_samples: int = Field(
        1_000_000,
        gt=0,
        description="Largest max_eval_samples a job may ask for (samples per evaluation split).",
    )

    quota_active_jobs: int = Field(
        20,
        gt=0,
        description="Most jobs a tenant may have that have not ended (queued, running, "
        "cancelling); one more is a 429.",
    )
    quota_compute_seconds_per_day: float = Field(
        7 * 24 * 3600.0,
        gt=0,
        allow_inf_nan=False,
        description="Most worker seconds (the wall time of its jobs' steps, all workers "
        "together) a tenant may use in any 24 hours; while over it, new jobs are a 429 with "
        "Retry-After.",
    )
    quota_stored_bytes: int = Field(
        100 * 1024 * MiB,
        gt=0,
        description="Most bytes the service stores for a tenant: uploaded data sets and the "
        "model versions its jobs produce; an upload or job that would pass it is a 413.",
    )
    quota_overrides: dict[str, TenantQuota] = Field(
        default_factory=dict,
        description="Quotas of particular tenants, by tenant name or id, e.g. "
        '`{"acme": {"active_jobs": 100, "stored_bytes": 1e12}}`; what one leaves out is the '
        "global quota.",
    )

    metrics_job_counts: bool = Field(
        True,
        description="Show job counts by state (over all tenants) on /metrics; false hides them.",
    )
    metrics_token: SecretStr | None = Field(
        None,
        description="When set, /metrics answers only `Authorization: Bearer <this token>` "
        "(401 otherwise); unset, it is open to whoever reaches the port.",
    )

    deletion_request_due_months: int = Field(
        1,
        ge=1,
        le=12,
        description="A deletion request's default due date: this many calendar months after "
        "it was received (GDPR Art. 12(3): one month).",
    )
    deletion_request_max_samples: int = Field(
        10_000,
        gt=0,
        description="Most samples one deletion request may name (each image is read and "
        "hashed when it is received, to recognise duplicates).",
    )
    deletion_request_max_attempts: int = Field(
        3,
        gt=0,
        description="Jobs that may fail (or be cancelled) carrying a deletion request before "
        "it is FAILED rather than PENDING again.",
    )

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
    retention_forget_data: Literal["delete", "keep"] = Field(
        "delete",
        description="When a job ends, its forget set's stored files (the forgotten samples' "
        "images of an uploaded data set, and every copy the job made): delete, or keep. A "
        "tenant's own policy overrides it (negmerge admin tenants retention).",
    )
    retention_intermediates: Literal["delete", "keep"] = Field(
        "delete",
        description="When a job ends, its task vectors, merged vector, base copies, decoded "
        "caches and its work directory's weights: delete, or keep (their hashes stay in "
        "the job's result and report either way).",
    )
    retention_superseded: Literal["block", "delete", "keep"] = Field(
        "block",
        description="A version a job unlearned from (it still holds the forgotten data): "
        "block (no downloads, not a base, unless an admin keeps it with a reason), delete "
        "its bytes (a tombstone; versions stored as deltas of it are made dense first), or "
        "keep it usable (for models whose forget sets are not personal data).",
    )
    webhook_secret_grace_seconds: float = Field(
        24 * 3600.0,
        ge=0,
        description="After the tenant's signing secret is rotated, deliveries are signed with "
        "the old secret too for this long, so receivers can switch over.",
    )

    def variants_per_device(self) -> int:
        """worker_variants_per_device resolved."""
        auto = self.worker_variants_per_device == "auto"
        return 1 if auto else int(self.worker_variants_per_device)

    @field_validator("data_roots")
    @classmethod
    def _apart_from_the_servers_files(cls, roots: list[str], info: ValidationInfo) -> list[str]:
        """A data root that contains the artifact root (or lies inside it) lets a tenant
        register another tenant's stored models and uploads by path.
        A field validator: its error shows the data roots, not the database URL."""
        own = {
            "artifact_root": info.data.get("artifact_root", ""),
            "scratch_root": info.data.get("scratch_root", ""),
        }
        if info.data.get("broker_url", "").startswith("filesystem:"):
            own["broker_folder"] = info.data.get("broker_folder", "")
        database_url = info.data.get("database_url", "")
        if database_url.startswith("sqlite:///"):
            own["database_url"] = database_url.removeprefix("sqlite:///")
        own = {name: path for name, path in own.items() if path}
        for root in roots:
            shared, placeholder, rest = root.partition(TENANT)
            if placeholder and (not shared.endswith("/") or rest[:1] not in ("", "/")):
                raise ValueError(
                    f"NEGMERGE_DATA_ROOTS: {root!r}: {TENANT} must be a whole path segment, "
                    f"as in /srv/data/{TENANT}"
                )
            if TENANT in rest:
                raise ValueError(f"NEGMERGE_DATA_ROOTS: {root!r}: {TENANT} may appear once")
            for name, path in own.items():
                if _overlap(shared, path):
                    raise ValueError(
                        f"NEGMERGE_DATA_ROOTS: {root!r} overlaps NEGMERGE_{name.upper()} "
                        f"{path!r}: tenants could register "
                        "the server's own files (other tenants' models and uploads) by path; "
                        "keep the data roots and the server's files apart (e.g. data roots "
                        "under /srv/data, the artifact root /srv/var/artifacts)"
                    )
        return roots


def _location(uri: str) -> str:
    """`uri` as a comparable prefix: a local path made absolute, links resolved, or the URI;
    with one trailing '/'."""
    if "://" not in uri or uri.startswith("file://"):
        path = uri.removeprefix("file://")
        return "file://" + str(Path(os.path.abspath(path)).resolve()).rstrip("/") + "/"
    return uri.rstrip("/") + "/"


def _overlap(one: str, other: str) -> bool:
    """Whether either location contains the other (or they are the same)."""
    a, b = _location(one), _location(other)
    return a.startswith(b) or b.startswith(a)


@lru_cache
def get_settings() -> Settings:
    """The settings of this process, read once from the environment."""
    return Settings()
