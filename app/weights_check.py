"""Checking that registered weights fit their architecture, outside the API's process.

The check (negmerge.models.check_weights) builds the architecture on PyTorch's meta device.
Done in the API process, it imported timm or open_clip and left their objects on the heap
after start-up's gc.freeze(): every later full garbage collection walked about 200,000 more
objects and paused the requests in flight for 60-350 ms (bench/api_load.py: the job GET's p95
went from under 2x to about 4x the bare route's). So each check runs in a child process forked
from a fork server that has the model libraries imported: the API process never imports them,
and nothing of a check stays behind in it. The first check starts the server (it imports
torch, timm and open_clip: 3 s on an idle 2-core host, ~10 s on a busy one); each check after
it forks a child in ~50 ms. A fresh interpreter per check would hold no memory between
registrations but take those seconds every time; the server holds ~430 MiB of its own.
A child gets the spec as data, answers in JSON, is killed past its time limit, and may grow
its address space by a bounded amount only.
"""

from __future__ import annotations

import json
import multiprocessing
import resource
import threading
from pathlib import Path
from typing import Any

from negmerge.errors import CheckpointError, NegMergeError
from negmerge.models import ModelSpec, check_weights

# What the fork server imports once (the child's own module, both families' model code).
_context = multiprocessing.get_context("forkserver")
_context.set_forkserver_preload(
    ["app.weights_check", "negmerge.models.classifier", "negmerge.models.open_clip"]
)
# Children at a time: concurrent registrations wait their turn instead of each forking one.
_slots = threading.BoundedSemaphore(2)
_ERRORS = {"CheckpointError": CheckpointError, "NegMergeError": NegMergeError}
_MAX_MESSAGE_CHARS = 4000
_MAX_ANSWER_BYTES = 1024 * 1024


def check_weights_in_child(spec: ModelSpec, *, timeout_seconds: float, memory_mib: int) -> None:
    """negmerge.models.check_weights(spec) in a child process: raise what it raises
    (NegMergeError, or its CheckpointError), or NegMergeError naming the architecture when
    the child runs past `timeout_seconds` or needs more than `memory_mib` MiB beyond the
    libraries it starts with. RuntimeError if the child dies without an answer."""
    with _slots:
        reader, writer = _context.Pipe(duplex=False)
        child = _context.Process(
            target=_child,
            args=(spec.model_dump(mode="json"), memory_mib * 1024 * 1024, writer),
            name="negmerge-weights-check",
            daemon=True,
        )
        try:
            child.start()  # the first one waits for the fork server's imports
            writer.close()  # the child holds its own end: its exit is an end of file here
            if not reader.poll(timeout_seconds):
                child.kill()
                raise NegMergeError(
                    f"architecture: building {spec.architecture} to check the weights took "
                    f"longer than {timeout_seconds:g} s"
                )
            try:
                kind, message = json.loads(reader.recv_bytes(_MAX_ANSWER_BYTES))
            except EOFError:
                child.join(timeout_seconds)
                raise RuntimeError(
                    f"the weights check exited without an answer (exit code {child.exitcode})"
                ) from None
        finally:
            reader.close()
            if child.pid is not None:
                child.join(timeout_seconds)
    if kind == "ok":
        return
    if kind == "memory":
        raise NegMergeError(
            f"architecture: building {spec.architecture} to check the weights needs more "
            f"than {memory_mib} MiB"
        )
    if kind in _ERRORS:
        raise _ERRORS[kind](message)
    raise RuntimeError(f"the weights check failed: {message}")


def _child(spec_fields: dict[str, Any], memory_bytes: int, answer: Any) -> None:
    """The child: the check on `spec_fields`, its outcome sent as JSON [kind, message]."""
    _limit_address_space(memory_bytes)
    try:
        check_weights(ModelSpec(**spec_fields))
        outcome = ["ok", ""]
    except MemoryError:
        outcome = ["memory", ""]
    except NegMergeError as exc:
        kind = "CheckpointError" if isinstance(exc, CheckpointError) else "NegMergeError"
        outcome = [kind, str(exc)[:_MAX_MESSAGE_CHARS]]
    except Exception as exc:  # a bug, not the request's fault: the API answers 500
        outcome = ["error", f"{type(exc).__name__}: {exc}"[:_MAX_MESSAGE_CHARS]]
    answer.send_bytes(json.dumps(outcome).encode())
    answer.close()


def _limit_address_space(extra_bytes: int) -> None:
    """Let this process's address space grow by `extra_bytes` at most (Linux; elsewhere
    only the time limit applies)."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return
    (size_kib,) = (line.split()[1] for line in status.splitlines() if line.startswith("VmSize:"))
    limit = int(size_kib) * 1024 + extra_bytes
    _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
