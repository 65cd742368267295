"""An AuditEvent for every access to the FHIR API, stored in the FHIR store.

The request path records what happened (who, which interaction, which resources, the
HTTP outcome) into an :class:`AuditTrail`, which writes AuditEvents in batches from a
background thread, so an access costs the request no database write. The same thread
writes each request's access log line (request id, method, path, status, time; never the
query string), so formatting it and writing it to stderr and the log file happen off the
event loop too (up to about ``gather_seconds`` after the response). Stopping the trail
writes what is left; a crash can lose the last batch (at most ``flush_seconds`` of
events). AuditEvents are readable only with the admin scope ``system/AuditEvent.read``.

Each AuditEvent names every resource returned (matches and included resources) or tried
(a failed read: 401, 403, 404), and the patients of the resources returned as entities of
type Person, role Patient, so ``AuditEvent?patient:identifier=<system>|<PatientID>``
answers "who saw this patient". An AuditEvent may name the patient (also in the query of
a search); logs never do.
"""

from __future__ import annotations

import base64
import json
import logging
import queue
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Final

from node.fhir import codes
from node.fhir.resources import fast_id, now_instant
from node.fhir.store import FhirStore, StoredResource

log = logging.getLogger("medgemma.fhir.audit")
#: the access log (one line per request); the API's logger name, as before it moved here
access_log = logging.getLogger("medgemma.fhir.api")

_ACTIONS: Final = {
    "read": "R",
    "vread": "R",
    "history-instance": "R",
    "search-type": "E",
    "create": "C",
    "update": "U",
    "delete": "D",
    "operation": "E",
    "capabilities": "R",
}


@dataclass
class AccessRecord:
    """What one request did, filled in while it is handled (request.state.access)."""

    request_id: str
    method: str
    path: str
    interaction: str = "operation"  # a restful-interaction code
    resource_type: str = ""
    entities: list[str] = field(default_factory=list)  # "Type/id" read or written
    agent: str = ""  # principal name; "" = not authenticated
    agent_kind: str = ""
    client_address: str = ""
    query: str = ""
    status: int = 0
    ms: float = 0.0  # the time it took, for the access log line
    audited: bool = True  # False: only the log line (the CapabilityStatement, /metrics)
    #: the resources served (their subjects are the patients the AuditEvent names)
    served: list[StoredResource] = field(default_factory=list)

    def returned(self, resources: Iterable[StoredResource]) -> None:
        """Record the resources a response carries: entities, and their patients."""
        self.served = list(resources)
        self.entities = list(dict.fromkeys(f"{r.resource_type}/{r.id}" for r in self.served))


def log_access(rec: AccessRecord) -> None:
    """The access log line of a request: no query string (it can name a patient).

    The record is made and handled as ``access_log.info`` would, with this function as its
    source, without the stack walk ``Logger.info`` does to find the caller: one line per
    request, that walk was half of the line's cost under load (docs/performance.md)."""
    if not access_log.isEnabledFor(logging.INFO):
        return
    record = access_log.makeRecord(
        access_log.name, logging.INFO, __file__, _LOG_ACCESS_LINE,
        "%s %s %s -> %d (%.1f ms)", (rec.request_id, rec.method, rec.path, rec.status, rec.ms),
        None, func="log_access", extra={"request_id": rec.request_id},
    )  # fmt: skip
    access_log.handle(record)


_LOG_ACCESS_LINE = log_access.__code__.co_firstlineno


def _patients(served: Iterable[StoredResource]) -> list[dict[str, Any]]:
    """The patients (subject references) of served resources, each once."""
    seen: dict[str, dict[str, Any]] = {}
    for r in served:
        found = _patient_of(r.body)
        if found is not None:
            seen.setdefault(*found)
    return list(seen.values())


@lru_cache(maxsize=1024)
def _patient_of(body: str) -> tuple[str, dict[str, Any]] | None:
    """(key, reference) of the patient a stored resource body is about, or None.

    Cached by the body itself (a version's body never changes; the same reports are
    served again and again): parsing every served body per AuditEvent cost this thread
    more than writing the events."""
    subject = json.loads(body).get("subject")
    if not isinstance(subject, dict) or subject.get("type", "Patient") != "Patient":
        return None
    what = {k: subject[k] for k in ("reference", "identifier") if k in subject}
    return (json.dumps(what, sort_keys=True), what) if what else None


def _patient_entity(what: dict[str, Any]) -> dict[str, Any]:
    return {
        "what": {"type": "Patient", **what},
        "type": {"system": codes.AUDIT_ENTITY_TYPE, "code": "1", "display": "Person"},
        "role": {"system": codes.OBJECT_ROLE, "code": "1", "display": "Patient"},
    }


def audit_event(rec: AccessRecord, recorded: str | None = None) -> dict[str, Any]:
    """The AuditEvent (R4) of one access.

    Outcome (AuditEventOutcome): 0 success, 4 minor failure (a 4xx: the request was
    refused or named nothing known), 8 serious failure (a 5xx).
    """
    outcome = "0" if rec.status < 400 else ("4" if rec.status < 500 else "8")
    agent: dict[str, Any] = {
        "requestor": True,
        "who": (
            {"identifier": {"value": rec.agent}, "display": f"{rec.agent_kind} {rec.agent}"}
            if rec.agent
            else {"display": "unauthenticated client"}
        ),
    }
    if rec.client_address:
        agent["network"] = {"address": rec.client_address, "type": "2"}
    entities: list[dict[str, Any]] = [{"what": {"reference": ref}} for ref in rec.entities]
    entities += [_patient_entity(what) for what in _patients(rec.served)]
    detail = [{"type": "request-id", "valueString": rec.request_id}]
    if rec.query:
        entities.append(
            {
                "type": {
                    "system": codes.AUDIT_ENTITY_TYPE,
                    "code": "2",
                    "display": "System Object",
                },
                "description": f"{rec.method} {rec.path}",
                "query": base64.b64encode(rec.query.encode()).decode(),
                "detail": detail,
            }
        )
    else:
        entities.append({"description": f"{rec.method} {rec.path}", "detail": detail})
    return {
        "resourceType": "AuditEvent",
        "id": fast_id(),
        "type": {"system": codes.AUDIT_EVENT_TYPE, "code": "rest", "display": "RESTful Operation"},
        "subtype": [{"system": codes.RESTFUL_INTERACTION, "code": rec.interaction}],
        "action": _ACTIONS.get(rec.interaction, "E"),
        "recorded": recorded or now_instant(),
        "outcome": outcome,
        "outcomeDesc": f"HTTP {rec.status}",
        "agent": [agent],
        "source": {
            "site": "medgemma-node",
            "observer": {"display": "medgemma-node FHIR API"},
            "type": [{"system": codes.SECURITY_SOURCE_TYPE, "code": "3", "display": "Web Server"}],
        },
        "entity": entities,
    }


class AuditTrail:
    """Writes AuditEvents in batches, and the access log lines, from a background thread."""

    def __init__(
        self,
        store: FhirStore,
        flush_seconds: float = 0.25,
        batch: int = 500,
        gather_seconds: float = 0.1,
    ) -> None:
        self.store = store
        self.flush_seconds = flush_seconds
        self.gather_seconds = min(gather_seconds, flush_seconds)
        self.batch = batch
        # (access, when): the AuditEvent is built in the thread, off the request path
        self._queue: queue.Queue[tuple[AccessRecord, str] | None] = queue.Queue(maxsize=100_000)
        self._thread = threading.Thread(target=self._run, name="fhir-audit", daemon=True)
        self._thread.start()
        self.dropped = 0

    def record(self, rec: AccessRecord) -> None:
        """A finished request: its log line, and its AuditEvent when ``rec.audited``."""
        if not self._thread.is_alive():  # closed: nothing would write them
            log_access(rec)
            if rec.audited:
                self._write([self._event(rec, now_instant())])
            return
        try:
            self._queue.put_nowait((rec, now_instant()))
        except queue.Full:  # the database is far behind; say so rather than block requests
            log_access(rec)
            self.dropped += 1
            if self.dropped % 1000 == 1:
                log.error("audit queue full: %d AuditEvents dropped so far", self.dropped)

    def _run(self) -> None:
        """Idle: wait for a record. Then let ``gather_seconds`` of records arrive without
        waking for each (a wake-up per request cost the event loop a GIL hand-off and a
        futex call each time), log them, and write their AuditEvents in one transaction
        (one commit, whatever the request rate)."""
        stop = False
        while not stop:
            try:
                first = self._queue.get(timeout=self.flush_seconds)
            except queue.Empty:
                continue
            if first is not None and self.gather_seconds > 0:
                if self._queue.qsize() < self.batch:  # a backlog: no waiting
                    time.sleep(self.gather_seconds)
            items = [first]
            while items[-1] is not None and len(items) < self.batch:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            events = []
            for item in items:
                if item is None:
                    stop = True
                    continue
                log_access(item[0])
                if item[0].audited:
                    events.append(self._event(*item))
            if events:
                self._write(events)
            for _ in items:
                self._queue.task_done()

    @staticmethod
    def _event(rec: AccessRecord, recorded: str) -> dict[str, Any]:
        try:
            return audit_event(rec, recorded)
        except ValueError:  # a served body that does not parse: the access is still recorded
            log.exception("%s: AuditEvent without patients", rec.request_id)
            rec.served = []
            return audit_event(rec, recorded)

    def _write(self, events: list[dict[str, Any]]) -> None:
        try:
            self.store.insert_new(events)
        except Exception:
            log.exception("could not write %d AuditEvents", len(events))

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until everything recorded so far is written; False on timeout."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)
