"""/v1/report-signing-key: the public key evidence reports are verified with (no API key:
anyone holding a report may check it)."""

from __future__ import annotations

from fastapi import APIRouter

from app.api.common import SettingsDep
from app.schemas.jobs import ReportSigningKey
from app.services.report_signing import ALGORITHM, public_key_pem, signer_for

router = APIRouter(prefix="/v1/report-signing-key", tags=["unlearning jobs"])


@router.get("", response_model=ReportSigningKey, summary="The key that signs reports")
def get_signing_key(settings: SettingsDep) -> ReportSigningKey:
    """The service's Ed25519 public key (PEM) and its key id, as reports' `signature.key_id`
    names it. `negmerge admin report verify FILE --public-key KEY.pem` checks a report."""
    signer = signer_for(settings.report_signing_key_file)
    return ReportSigningKey(
        algorithm=ALGORITHM, key_id=signer.key_id, public_key_pem=public_key_pem(signer.public_key)
    )
