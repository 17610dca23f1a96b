"""Ed25519 signatures on evidence reports, so that a filed report can be checked offline.

The service's signing key is a PEM file (NEGMERGE_REPORT_SIGNING_KEY_FILE). If it does not
exist it is generated on first use, written 0600 and never overwritten: an operator who wants
to keep the key elsewhere (a secret mount) points the setting at it. The key id is the first
16 hex digits of the sha256 of the raw public key, so a report names the key that signed it.

What is signed: the report's JSON with its `signature` member removed, serialised
canonically (keys sorted, no whitespace, ASCII only). The same bytes are rebuilt from the
downloaded file by `verify`, which needs nothing but this module and the public key.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import uuid
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

ALGORITHM = "Ed25519"
SIGNATURE_FIELD = "signature"


class SignatureProblem(ValueError):
    """A report that does not verify: the message says why."""


def canonical_bytes(report: dict[str, Any]) -> bytes:
    """The bytes a report's signature covers: its JSON without `signature`, canonical."""
    unsigned = {k: v for k, v in report.items() if k != SIGNATURE_FIELD}
    return json.dumps(
        unsigned, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode()


def key_id_of(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def public_key_pem(public_key: Ed25519PublicKey) -> str:
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


@dataclass(frozen=True)
class ReportSigner:
    private_key: Ed25519PrivateKey

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self.private_key.public_key()

    @property
    def key_id(self) -> str:
        return key_id_of(self.public_key)

    def sign(self, report: dict[str, Any]) -> dict[str, Any]:
        """`report` with its `signature` block: {algorithm, key_id, value (base64)}."""
        value = self.private_key.sign(canonical_bytes(report))
        return {
            **report,
            SIGNATURE_FIELD: {
                "algorithm": ALGORITHM,
                "key_id": self.key_id,
                "value": base64.b64encode(value).decode(),
            },
        }


@lru_cache(maxsize=8)
def signer_for(key_file: str) -> ReportSigner:
    """The signer of the key in `key_file`, generated there (0600) if the file is missing."""
    path = Path(key_file)
    if not path.exists():
        _generate(path)
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path}: not an Ed25519 private key (report_signing_key_file)")
    return ReportSigner(key)


def _generate(path: Path) -> None:
    """Write a new key without ever replacing one: processes starting together may race, and
    the first link wins (the others read its key)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(pem)
        with contextlib.suppress(FileExistsError):  # another process's key came first
            os.link(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def load_public_key(pem: bytes) -> Ed25519PublicKey:
    """A public key from PEM (a private key's PEM gives its public key)."""
    try:
        key: Any = serialization.load_pem_public_key(pem)
    except ValueError:
        try:
            key = serialization.load_pem_private_key(pem, password=None).public_key()
        except (ValueError, TypeError):
            raise SignatureProblem("the public key is not a PEM Ed25519 key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SignatureProblem("the public key is not an Ed25519 key")
    return key


def verify(report: dict[str, Any], public_key: Ed25519PublicKey) -> str:
    """Check `report`'s signature; returns the key id, or raises SignatureProblem."""
    block = report.get(SIGNATURE_FIELD)
    if not isinstance(block, dict):
        raise SignatureProblem("the report has no signature block")
    if block.get("algorithm") != ALGORITHM:
        raise SignatureProblem(f"signature.algorithm: {block.get('algorithm')!r}, not Ed25519")
    expected = key_id_of(public_key)
    if block.get("key_id") != expected:
        raise SignatureProblem(
            f"signature.key_id: signed by key {block.get('key_id')!r}, not by this public key "
            f"({expected})"
        )
    try:
        value = base64.b64decode(str(block.get("value", "")), validate=True)
        public_key.verify(value, canonical_bytes(report))
    except (InvalidSignature, ValueError):
        raise SignatureProblem(
            "the signature does not match the report's content: it was altered after signing"
        ) from None
    return expected
