"""Property-based tests of the FHIR API from its own OpenAPI document (schemathesis 4):
generated requests, valid and invalid, never get a server error (5xx).

The app runs in-process (ASGI) on a store with one pre-read, with a bearer token that has
every scope; follow-up questions go to a dispatcher that only records them. The example
count is bounded so the whole module runs in well under a minute.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.generation.modes import GenerationMode

from node.fhir.main import create_app
from node.fhir.projection import record_preread
from node.fhir.resources import IdentifierSystems, report_id
from node.fhir.store import FhirStore
from node.ledger import StudyLedger
from node.settings import load_settings
from tests.test_fhir_resources import add_study

TOKEN = "schemathesis-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MAX_EXAMPLES = 40


class RecordingDispatcher:
    """Takes follow-up questions and keeps them (no worker: they stay queued)."""

    def __init__(self) -> None:
        self.sent: list[str] = []

    def send_preread(self, study_uid: str, version: int) -> str:
        return ""

    def send_followup(self, question_id: str) -> str:
        self.sent.append(question_id)
        return question_id

    def queue_depth(self) -> int | None:
        return len(self.sent)

    def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def fhir_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    tmp: Path = tmp_path_factory.mktemp("schemathesis")
    cfg = load_settings(
        None,
        storage={"data_dir": str(tmp / "var")},
        auth={"tokens": [{"name": "fuzzer", "sha256": hashlib.sha256(TOKEN.encode()).hexdigest(),
                          "scopes": ["system/*.*", "system/AuditEvent.read"]}]},
        fhir={"respond_sync_timeout_seconds": 0.2, "max_request_bytes": 65536},
    )  # fmt: skip
    ledger = StudyLedger(f"sqlite:///{tmp / 'ledger.sqlite3'}")
    uid = add_study(ledger)
    record_preread(ledger, uid, 1, systems=IdentifierSystems())
    store = FhirStore(ledger)
    app = create_app(cfg, store=store, dispatcher=RecordingDispatcher())
    app.state.report_id = report_id(uid)
    yield app
    app.state.audit.close()
    ledger.close()


@pytest.fixture(scope="module")
def fhir_schema(fhir_app: Any) -> Any:
    loaded = schemathesis.openapi.from_asgi("/fhir/openapi.json", fhir_app)
    loaded.report_id = fhir_app.state.report_id
    return loaded


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_generated_requests_never_get_a_server_error(
    fhir_schema: Any, mode: GenerationMode
) -> None:
    """Every operation, with schema-conforming (positive) or violating (negative) requests."""
    operations = [result.ok() for result in fhir_schema.get_all_operations()]
    assert len(operations) >= 15
    statuses: list[int] = []
    for operation in operations:
        known: dict[str, Any] = {}
        if mode is GenerationMode.POSITIVE and operation.path.startswith(
            "/fhir/DiagnosticReport/{"
        ):
            known = {"path_parameters": {"resource_id": fhir_schema.report_id}}

        @given(case=operation.as_strategy(generation_mode=mode, **known))
        @settings(
            max_examples=MAX_EXAMPLES,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,
            database=None,
        )
        def check(case: Any) -> None:
            response = case.call_and_validate(headers=AUTH, checks=[not_a_server_error])
            statuses.append(response.status_code)

        try:
            check()
        except Unsatisfiable:
            # nothing to violate: an operation without parameters or body (GET /metadata)
            assert mode is GenerationMode.NEGATIVE, operation.label
        except Exception as exc:
            exc.add_note(f"operation: {operation.label} ({mode.value})")
            raise
    # the generated requests reached the handlers, not only the validators
    assert any(200 <= s < 300 for s in statuses) and any(400 <= s < 500 for s in statuses)
