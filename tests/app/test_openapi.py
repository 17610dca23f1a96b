"""Schemathesis over the OpenAPI document, against the app in process: no 5xx, and every
response matches the document (status code, content type, body schema)."""

from __future__ import annotations

import os

import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
EXAMPLES_PER_OPERATION = int(os.environ.get("NEGMERGE_SCHEMATHESIS_EXAMPLES", "12"))


def test_api_conforms_to_its_openapi_document(app, registered):  # type: ignore[no-untyped-def]
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 18
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def conforms(case):  # type: ignore[no-untyped-def]
            case.headers = {**(case.headers or {}), **registered.caller.headers}
            case.call_and_validate(checks=CHECKS)

        conforms()
