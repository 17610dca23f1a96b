"""The report signing key: made on first use (0600), then kept; signatures cover everything
but the signature block, whatever the key order or whitespace of the file."""

from __future__ import annotations

import json
import stat

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, generate_private_key

from app.services.report_signing import SignatureProblem, signer_for, verify


def test_the_key_is_generated_once_private_and_kept(tmp_path):  # type: ignore[no-untyped-def]
    path = tmp_path / "keys" / "signing.pem"
    first = signer_for(str(path))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    signer_for.cache_clear()
    assert signer_for(str(path)).key_id == first.key_id  # read back, not replaced
    assert [p.name for p in path.parent.iterdir()] == ["signing.pem"]  # no temporary left


def test_a_signature_survives_reformatting_but_not_an_edit(tmp_path):  # type: ignore[no-untyped-def]
    signer = signer_for(str(tmp_path / "signing.pem"))
    report = signer.sign({"job_id": "j", "metrics": {"after": {"forget_acc": 12.5}}, "n": None})
    reformatted = json.loads(json.dumps(dict(reversed(report.items())), indent=4))
    assert verify(reformatted, signer.public_key) == signer.key_id
    reformatted["metrics"]["after"]["forget_acc"] = 12.0
    with pytest.raises(SignatureProblem, match="altered"):
        verify(reformatted, signer.public_key)


def test_a_key_that_is_not_ed25519_is_refused(tmp_path):  # type: ignore[no-untyped-def]
    path = tmp_path / "ec.pem"
    path.write_bytes(
        generate_private_key(SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(ValueError, match="not an Ed25519 private key"):
        signer_for(str(path))
