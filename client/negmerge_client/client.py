"""A small HTTP client for the NegMerge REST API (/v1), used by the `negmerge-client` command
and by scripts. It needs only httpx: nothing from the server side is imported.

    with ServiceClient("http://127.0.0.1:8000", api_key) as service:
        job = service.submit_job(body, idempotency_key="DSR-42")
        job = service.wait_for_job(job["id"], on_update=print)

Responses are the API's JSON as plain dicts. Every failure, from a 4xx to a refused
connection or a checksum that does not match, is one exception type: ServiceError.
"""

from __future__ import annotations

import email.utils
import hashlib
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

import httpx

DEFAULT_API_URL = "http://127.0.0.1:8000"
TERMINAL_STATES = frozenset({"SUCCEEDED", "FAILED", "CANCELLED"})

JSON = dict[str, Any]


class ServiceError(Exception):
    """A request that did not succeed. `status` is the HTTP status, or 0 when no response came
    (connection refused, timeout) or the response could not be trusted (checksum mismatch);
    `code`, `message` and `fields` are the API's error body."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        fields: list[dict[str, str]] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.fields = fields or []

    def __str__(self) -> str:
        # One line, e.g. "422 invalid_request: forget.classes: unknown label 'x'".
        text = " ".join(self.message.split()) or "(no message)"
        return f"{self.status} {self.code}: {text}" if self.status else text

    @classmethod
    def from_response(cls, response: httpx.Response) -> ServiceError:
        try:
            error = response.json()["error"]
            return cls(
                response.status_code,
                str(error.get("code") or "http_error"),
                str(error.get("message") or response.reason_phrase),
                list(error.get("fields") or []),
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            # Not our error shape (a proxy's page, say): the start of the body is the best clue.
            text = response.text.strip()[:200] or response.reason_phrase
            return cls(response.status_code, "http_error", text)


class ServiceClient:
    """The REST API of one service, as one tenant's API key sees it."""

    def __init__(
        self,
        base_url: str = DEFAULT_API_URL,
        api_key: str | None = None,
        timeout: float = 30.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        headers = {"User-Agent": "negmerge-client"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ServiceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- operations ----------------------------------------------------------------------

    def health(self) -> JSON:
        """GET /readyz: whether the database and the broker are reachable (no key needed)."""
        response = self._send("GET", "/readyz", accept={200, 503})
        return response.json()

    # ---- models --------------------------------------------------------------------------

    def register_model(self, body: Mapping[str, Any]) -> JSON:
        """Register a base model (name, family, architecture, classes, weights_uri, ...)."""
        return self._json("POST", "/v1/models", json=dict(body))

    def list_models(self, page_size: int | None = None) -> Iterator[JSON]:
        """Every model of the tenant, following the cursor pages."""
        return self._pages("/v1/models", {}, page_size)

    def get_model(self, model_id: str) -> JSON:
        return self._json("GET", f"/v1/models/{model_id}")

    def model_versions(self, model_id: str) -> list[JSON]:
        """A model's versions, oldest first (1 is the base model)."""
        return self._json("GET", f"/v1/models/{model_id}/versions")["items"]

    def get_model_version(self, model_id: str, version: int) -> JSON:
        return self._json("GET", f"/v1/models/{model_id}/versions/{version}")

    def download_model_version(
        self,
        model_id: str,
        version: int,
        destination: str | os.PathLike[str],
        on_progress: Callable[[int, int | None], None] | None = None,
    ) -> Path:
        """Stream a version's weights to `destination` (a file, or a folder to put
        <model>-v<version>.safetensors in: one that exists, or a path ending in a separator,
        made if need be) and check their sha256 against the one the API reports; on a
        mismatch nothing is left behind. Returns the file written."""
        target = Path(destination)
        if os.fspath(destination).endswith(("/", os.sep)):  # "./weights/": a folder
            target.mkdir(parents=True, exist_ok=True)
        if target.is_dir():
            target = target / f"{model_id}-v{version}.safetensors"
        partial = target.with_name(f".{target.name}.part")
        path = f"/v1/models/{model_id}/versions/{version}/weights"
        digest = hashlib.sha256()
        try:  # whatever goes wrong, no partial or unverified file is left behind
            try:
                with self._http.stream("GET", path) as response:
                    if not response.is_success:
                        response.read()
                        raise ServiceError.from_response(response)
                    expected = response.headers.get("X-Checksum-Sha256")
                    size = response.headers.get("Content-Length")
                    total = int(size) if size and size.isdigit() else None
                    with partial.open("wb") as out:
                        for block in response.iter_bytes(1024 * 1024):
                            out.write(block)
                            digest.update(block)
                            if on_progress is not None:
                                on_progress(response.num_bytes_downloaded, total)
            except httpx.HTTPError as exc:
                raise self._unreachable(exc) from None
            expected = expected or self.get_model_version(model_id, version)["weights_sha256"]
            if digest.hexdigest() != expected.lower():
                raise ServiceError(
                    0,
                    "checksum_mismatch",
                    f"the weights downloaded from {self.base_url}{path} have sha256 "
                    f"{digest.hexdigest()}, but the service reports {expected}; "
                    "nothing was kept",
                )
            partial.replace(target)
        finally:
            partial.unlink(missing_ok=True)
        return target

    # ---- data sets -----------------------------------------------------------------------

    def register_dataset(
        self,
        name: str,
        manifest_uri: str,
        *,
        root_uri: str | None = None,
        model_id: str | None = None,
    ) -> JSON:
        """Register a data set by the URI of a manifest the server can read."""
        body = {"name": name, "manifest_uri": manifest_uri}
        if root_uri is not None:
            body["root_uri"] = root_uri
        if model_id is not None:
            body["model_id"] = str(model_id)
        return self._json("POST", "/v1/datasets", json=body)

    def upload_dataset(
        self, archive: str | os.PathLike[str] | BinaryIO, name: str, model_id: str | None = None
    ) -> JSON:
        """Upload a zip or tar(.gz) archive: images and a manifest, or an ImageFolder tree.
        The file is streamed, not read into memory."""
        form = {"name": name}
        if model_id is not None:
            form["model_id"] = str(model_id)
        if isinstance(archive, str | os.PathLike):
            with Path(archive).open("rb") as file:
                return self._upload(file, Path(archive).name, form)
        return self._upload(archive, Path(getattr(archive, "name", "data.zip")).name, form)

    def _upload(self, file: BinaryIO, filename: str, form: dict[str, str]) -> JSON:
        files = {"file": (filename, file, "application/octet-stream")}
        return self._json("POST", "/v1/datasets:upload", data=form, files=files)

    def list_datasets(self, page_size: int | None = None) -> Iterator[JSON]:
        return self._pages("/v1/datasets", {}, page_size)

    def get_dataset(self, dataset_id: str) -> JSON:
        return self._json("GET", f"/v1/datasets/{dataset_id}")

    # ---- deletion requests ---------------------------------------------------------------

    def submit_deletion_request(self, body: Mapping[str, Any]) -> JSON:
        """Send one data subject's request; a duplicate answers with the existing request
        (its `duplicate_of` is set)."""
        return self._json("POST", "/v1/deletion-requests", json=dict(body))

    def get_deletion_request(self, request_id: str) -> JSON:
        return self._json("GET", f"/v1/deletion-requests/{request_id}")

    def list_deletion_requests(
        self,
        state: str | Iterable[str] | None = None,
        *,
        model_id: str | None = None,
        subject_reference: str | None = None,
        page_size: int | None = None,
    ) -> Iterator[JSON]:
        """The tenant's deletion requests, newest first, fetched page by page."""
        params: dict[str, Any] = {
            "state": [state] if isinstance(state, str) else list(state or []),
            "model_id": model_id,
            "subject_reference": subject_reference,
        }
        return self._pages("/v1/deletion-requests", params, page_size)

    # ---- unlearning jobs -----------------------------------------------------------------

    def submit_job(self, body: Mapping[str, Any], idempotency_key: str | None = None) -> JSON:
        """Submit a deletion request. With an `idempotency_key`, a retry of the same body
        answers with the same job instead of starting another."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        return self._json("POST", "/v1/unlearning-jobs", json=dict(body), headers=headers)

    def get_job(self, job_id: str) -> JSON:
        return self._json("GET", f"/v1/unlearning-jobs/{job_id}")

    def list_jobs(
        self,
        state: str | Iterable[str] | None = None,
        *,
        model_id: str | None = None,
        subject_reference: str | None = None,
        created_after: datetime | str | None = None,
        created_before: datetime | str | None = None,
        page_size: int | None = None,
    ) -> Iterator[JSON]:
        """The tenant's jobs, newest first, following the cursor pages lazily (stop iterating
        to stop fetching)."""
        params: dict[str, Any] = {
            "state": [state] if isinstance(state, str) else list(state or []),
            "model_id": model_id,
            "subject_reference": subject_reference,
            "created_after": _iso(created_after),
            "created_before": _iso(created_before),
        }
        return self._pages("/v1/unlearning-jobs", params, page_size)

    def cancel_job(self, job_id: str) -> JSON:
        """Cancel a job: a queued one ends CANCELLED at once, a running one goes CANCELLING.
        A job that has already ended answers 409."""
        return self._json("POST", f"/v1/unlearning-jobs/{job_id}:cancel")

    def job_report(self, job_id: str) -> JSON:
        """The evidence report; its parts are null until the workers have produced them."""
        return self._json("GET", f"/v1/unlearning-jobs/{job_id}/report")

    def wait_for_job(
        self,
        job_id: str,
        on_update: Callable[[JSON], None] | None = None,
        poll_interval: float = 2.0,
        timeout: float | None = None,
    ) -> JSON:
        """Poll the job until it ends (SUCCEEDED, FAILED or CANCELLED) and return it; it does
        not raise for FAILED or CANCELLED, the caller reads `state`. `on_update` gets the job
        after every poll. Waits as long as the server's Retry-After says, else
        `poll_interval`; raises ServiceError (code "timeout") after `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            response = self._send("GET", f"/v1/unlearning-jobs/{job_id}")
            job = response.json()
            if on_update is not None:
                on_update(job)
            if job["state"] in TERMINAL_STATES:
                return job
            pause = _retry_after(response.headers.get("Retry-After"), poll_interval)
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ServiceError(
                        0,
                        "timeout",
                        f"job {job_id} is still {job['state']} after {timeout:g} s",
                    )
                pause = min(pause, left)
            time.sleep(pause)

    # ---- audit ---------------------------------------------------------------------------

    def list_audit(self, page_size: int | None = None, **filters: Any) -> Iterator[JSON]:
        """The tenant's audit trail, newest first (needs the audit:read scope). Filters:
        action, resource_type, resource_id, since, until."""
        params = {k: _iso(v) if isinstance(v, datetime) else v for k, v in filters.items()}
        return self._pages("/v1/audit", params, page_size)

    # ---- transport -----------------------------------------------------------------------

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self._send(method, path, **kwargs).json()

    def _send(
        self, method: str, path: str, accept: set[int] | None = None, **kwargs: Any
    ) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from None
        if (accept and response.status_code in accept) or (not accept and response.is_success):
            return response
        raise ServiceError.from_response(response)

    def _pages(self, path: str, params: dict[str, Any], page_size: int | None) -> Iterator[JSON]:
        query = {k: v for k, v in params.items() if v not in (None, [])}
        if page_size is not None:
            query["page_size"] = page_size
        while True:
            page = self._json("GET", path, params=query)
            yield from page["items"]
            token = page.get("next_page_token")
            if not token:
                return
            query["page_token"] = token

    def _unreachable(self, exc: httpx.HTTPError) -> ServiceError:
        if isinstance(exc, httpx.TimeoutException):
            return ServiceError(
                0, "request_timeout", f"{self.base_url} did not answer in time ({exc})"
            )
        reason = str(exc) or type(exc).__name__
        if isinstance(exc, httpx.ConnectError):
            refused = "refused" in reason.lower() or "errno 111" in reason.lower()
            reason = "connection refused" if refused else reason
            return ServiceError(
                0,
                "unreachable",
                f"cannot reach the NegMerge service at {self.base_url}: {reason} "
                "(is it running? set the URL with --api-url or NEGMERGE_API_URL)",
            )
        return ServiceError(0, "unreachable", f"request to {self.base_url} failed: {reason}")


def _retry_after(value: str | None, default: float) -> float:
    """Seconds to wait from a Retry-After header (seconds or an HTTP date)."""
    if not value:
        return default
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return default
    return max(0.0, (moment - datetime.now(UTC)).total_seconds())


def _iso(moment: datetime | str | None) -> str | None:
    return moment.isoformat() if isinstance(moment, datetime) else moment
