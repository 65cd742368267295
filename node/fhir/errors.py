"""FHIR errors: one exception type, rendered as an OperationOutcome with one status code.

The status code says the kind of failure, the message says it in a sentence:

    400 invalid        the request cannot be understood (bad JSON, bad parameter, bad resource)
    401 login          no or an invalid bearer token
    403 forbidden      a valid token without the scope the request needs
    404 not-found      no such resource, resource type or route
    405 not-supported  the interaction is not supported on this resource type
    406 not-supported  the client does not accept application/fhir+json
    413 too-long       the request body is larger than fhir.max_request_bytes
    415 not-supported  the request body is not application/fhir+json (or application/json)
    422 processing     a valid resource the node cannot act on (business rule)
    500 exception      a bug; the message has the request id, never a traceback
    503 transient      this process has no work queue for follow-up questions
"""

from __future__ import annotations

import json
from typing import Any

from node.fhir import FHIR_JSON


class FhirError(Exception):
    """A request the FHIR API refuses; ``status`` and ``code`` (IssueType) say which kind."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str = "invalid",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers or {}


def operation_outcome(
    message: str, *, code: str = "invalid", severity: str = "error"
) -> dict[str, Any]:
    """An OperationOutcome with one issue whose ``diagnostics`` is ``message``."""
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": severity, "code": code, "diagnostics": message}],
    }


def outcome_body(message: str, *, code: str = "invalid", severity: str = "error") -> bytes:
    return json.dumps(operation_outcome(message, code=code, severity=severity)).encode()


def bad_request(message: str) -> FhirError:
    return FhirError(400, message, code="invalid")


def not_found(message: str) -> FhirError:
    return FhirError(404, message, code="not-found")


def unprocessable(message: str) -> FhirError:
    return FhirError(422, message, code="processing")


__all__ = [
    "FHIR_JSON",
    "FhirError",
    "bad_request",
    "not_found",
    "operation_outcome",
    "outcome_body",
    "unprocessable",
]
