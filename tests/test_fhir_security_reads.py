"""What the FHIR API discloses, as a hostile or under-scoped client probes it: included and
bundled resources only of types the token may read (an OperationOutcome says what was left
out), links that never follow a forged Host or forwarded header, and AuditEvents that name
the patient and every resource returned or tried (failed reads included)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from starlette.testclient import TestClient

from node.dispatch import InProcessDispatcher
from node.fhir.main import create_app
from node.fhir.projection import record_preread
from node.fhir.resources import IdentifierSystems, imaging_study_id, report_id
from node.fhir.server import ApiServer
from node.fhir.store import FhirStore
from node.ledger import StudyLedger
from node.settings import Settings, load_settings
from tests.test_fhir_resources import add_study, r4b_valid
from workers.followup import run_followup_by_id

FHIR = {"Content-Type": "application/fhir+json"}
PATIENTS = "urn:oid:1.2.3.4"
HOOK = "http://127.0.0.1:9/hook"  # allowed, never called: these Subscriptions are refused
TOKENS = {
    "ris": ["system/*.read", "system/Communication.write"],
    "reports": ["system/DiagnosticReport.read"],
    "provenance": ["system/Provenance.read"],
    "questions": ["system/Communication.read", "system/Communication.write"],
    "auditor": ["system/AuditEvent.read"],
    "subscriber": ["system/Subscription.*"],
}


def bearer(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {name}-secret"}


def node_settings(tmp: Any, **fhir: Any) -> Settings:
    tokens = [
        {"name": n, "sha256": hashlib.sha256(f"{n}-secret".encode()).hexdigest(), "scopes": s}
        for n, s in TOKENS.items()
    ]
    return load_settings(
        None,
        storage={"data_dir": str(tmp / "var"), "min_free_mb": 0},
        api={"host": "127.0.0.1", "port": 0},
        engine={"name": "demo"},
        auth={"tokens": tokens},
        fhir={"patient_id_system": PATIENTS, "accession_system": "urn:oid:1.2.3.5",
              "respond_sync_timeout_seconds": 20,
              "subscription_allowed_endpoints": [HOOK], **fhir},
    )  # fmt: skip


@dataclass
class Node:
    server: ApiServer
    settings: Settings
    studies: dict[str, str]  # accession -> study UID

    def client(self, who: str | None = "ris") -> httpx.Client:
        headers = bearer(who) if who else {}
        return httpx.Client(base_url=self.server.base_url, headers=headers, timeout=30)

    def audit_events(self, **params: str) -> list[dict[str, Any]]:
        assert self.server.app.state.audit.flush()
        with self.client("auditor") as c:
            r = c.get("/AuditEvent", params={"_count": "200", **params})
        assert r.status_code == 200, r.text
        return [e["resource"] for e in r.json().get("entry", [])]


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    tmp = tmp_path_factory.mktemp("fhir-security")
    settings = node_settings(tmp)
    settings.storage.data_path.mkdir(parents=True)
    ledger = StudyLedger(settings.storage.resolved_database_url())
    systems = IdentifierSystems(PATIENTS, "urn:oid:1.2.3.5")
    studies = {
        "ACC-1": add_study(ledger, patient_id="PAT-1", accession="ACC-1"),
        "ACC-2": add_study(ledger, patient_id="PAT-2", accession="ACC-2"),
    }
    for uid in studies.values():
        record_preread(ledger, uid, 1, systems=systems)
    dispatcher = InProcessDispatcher(lambda *_: None, run_followup_by_id(settings))
    server = ApiServer(settings, dispatcher=dispatcher)
    server.start()
    yield Node(server, settings, studies)
    server.stop()
    dispatcher.close()
    ledger.close()


def entries(bundle: dict[str, Any], mode: str | None = None) -> list[dict[str, Any]]:
    return [
        e["resource"]
        for e in bundle.get("entry", [])
        if mode is None or e.get("search", {}).get("mode") == mode
    ]


def types(resources: list[dict[str, Any]]) -> set[str]:
    return {r["resourceType"] for r in resources}


def withheld_message(bundle: dict[str, Any]) -> str:
    (outcome,) = [r for r in entries(bundle) if r["resourceType"] == "OperationOutcome"]
    return " ".join(i["diagnostics"] for i in outcome["issue"])


# ------------------------------------------------------------------- item 1: included types


def test_include_leaves_out_what_the_token_may_not_read_and_says_so(node: Node) -> None:
    report = report_id(node.studies["ACC-1"])
    query = [("identifier", "ACC-1"), ("_include", "DiagnosticReport:result"),
             ("_include", "DiagnosticReport:imaging-study")]  # fmt: skip
    with node.client("reports") as c:
        bundle = c.get("/DiagnosticReport", params=query).json()
        observation = c.get("/" + bundle["entry"][0]["resource"]["result"][0]["reference"])
    assert observation.status_code == 403  # a direct read is refused ...
    r4b_valid(bundle)
    assert [r["id"] for r in entries(bundle, "match")] == [report]
    assert entries(bundle, "include") == []  # ... and so is the read through _include
    assert types(entries(bundle, "outcome")) == {"OperationOutcome"}
    message = withheld_message(bundle)
    assert "ImagingStudy" in message and "Observation" in message
    assert "system/Observation.read" in message

    with node.client("ris") as c:  # a token that may read them gets them
        full = c.get("/DiagnosticReport", params=query).json()
    assert types(entries(full, "include")) == {"Observation", "ImagingStudy"}
    assert entries(full, "outcome") == []


@pytest.mark.parametrize(
    ("who", "path", "include", "withheld"),
    [
        ("provenance", "/Provenance", "Provenance:target", {"DiagnosticReport", "Observation"}),
        ("auditor", "/AuditEvent", "AuditEvent:entity", {"DiagnosticReport"}),
    ],
)
def test_every_include_is_checked_against_the_scopes(
    node: Node, who: str, path: str, include: str, withheld: set[str]
) -> None:
    with node.client("ris") as c:
        c.get("/DiagnosticReport", params={"identifier": "ACC-1"})
    assert node.server.app.state.audit.flush()
    with node.client(who) as c:
        bundle = c.get(path, params={"_include": include, "_count": "200"}).json()
    assert entries(bundle, "match")
    assert entries(bundle, "include") == []
    message = withheld_message(bundle)
    assert all(t in message for t in withheld), message


def test_the_audit_event_lists_the_included_resources(node: Node) -> None:
    uid = node.studies["ACC-2"]
    with node.client("ris") as c:
        r = c.get("/DiagnosticReport", params={"identifier": "ACC-2",
                                               "_include": "DiagnosticReport:result"})  # fmt: skip
    observations = [f"Observation/{o['id']}" for o in entries(r.json(), "include")]
    assert len(observations) == 2
    (event,) = [
        e
        for e in node.audit_events(entity=f"DiagnosticReport/{report_id(uid)}")
        if e["subtype"][0]["code"] == "search-type"
        and any(x.get("what", {}).get("reference") in observations for x in e["entity"])
    ]
    named = {x["what"]["reference"] for x in event["entity"] if "reference" in x.get("what", {})}
    assert set(observations) <= named


def test_answer_bundles_of_ask_and_the_poll_leave_out_what_the_token_may_not_read(
    node: Node,
) -> None:
    report = report_id(node.studies["ACC-1"])
    body = {"resourceType": "Parameters", "parameter": [
        {"name": "question", "valueString": "How big is A2?"}]}  # fmt: skip
    with node.client("questions") as c:
        r = c.post(f"/DiagnosticReport/{report}/$ask", json=body,
                   headers={**FHIR, "Prefer": "respond-sync"})  # fmt: skip
        assert r.status_code == 200, r.text
        polled = c.get(r.headers["content-location"])
        assert polled.status_code == 200, polled.text
        assert c.get(f"/DiagnosticReport/{report}").status_code == 403
    for bundle in (r.json(), polled.json()):
        r4b_valid(bundle)
        kept = entries(bundle)
        assert types(kept) == {"Communication", "OperationOutcome"}, types(kept)
        message = withheld_message(bundle)
        assert "DiagnosticReport" in message and "Observation" in message


def test_a_subscription_sends_resources_only_to_a_client_that_may_read_them(node: Node) -> None:
    def subscribe(payload: str) -> httpx.Response:
        channel = {"type": "rest-hook", "endpoint": HOOK}
        if payload:
            channel["payload"] = payload
        sub = {"resourceType": "Subscription", "status": "requested", "reason": "RIS",
               "criteria": "DiagnosticReport?status=preliminary", "channel": channel}  # fmt: skip
        with node.client("subscriber") as c:
            return c.post("/Subscription", json=sub, headers=FHIR)

    refused = subscribe("application/fhir+json")
    assert refused.status_code == 403, refused.text
    assert "system/DiagnosticReport.read" in refused.json()["issue"][0]["diagnostics"]
    created = subscribe("")  # no payload carries no resource: no read scope needed
    assert created.status_code == 201, created.text
    with node.client("subscriber") as c:
        assert c.delete(f"/Subscription/{created.json()['id']}").status_code == 204


# ------------------------------------------------------------------- item 4: links


def test_links_never_follow_a_forged_host_or_forwarded_header(node: Node) -> None:
    base = node.server.base_url  # http://127.0.0.1:<port>/fhir: the address it listens on
    forged = {
        "Host": "evil.example",
        "X-Forwarded-Host": "evil.example",
        "X-Forwarded-Proto": "https",
        "Forwarded": "host=evil.example;proto=https",
    }
    report = report_id(node.studies["ACC-1"])
    body = {"resourceType": "Parameters", "parameter": [
        {"name": "question", "valueString": "Is A1 smooth?"}]}  # fmt: skip
    with node.client() as c:
        bundle = c.get("/DiagnosticReport", params={"_count": "1"}, headers=forged).json()
        asked = c.post(f"/DiagnosticReport/{report}/$ask", json=body,
                       headers={**FHIR, **forged, "Prefer": "respond-sync"})  # fmt: skip
    urls = [link["url"] for link in bundle["link"]] + [e["fullUrl"] for e in bundle["entry"]]
    urls += [asked.headers["content-location"], asked.headers["location"]]
    assert all(u.startswith(base + "/") for u in urls), urls


def _client_from(app: Any, client_ip: str) -> TestClient:
    """A client whose requests reach the app from ``client_ip`` (addressed to 10.1.1.1)."""
    return TestClient(app, base_url="http://10.1.1.1:8080", headers=bearer("ris"),
                      client=(client_ip, 40000))  # fmt: skip


def test_forwarded_headers_count_only_from_trusted_proxies(tmp_path: Any) -> None:
    settings = node_settings(tmp_path, trusted_proxies=["10.9.0.0/16"])
    settings.storage.data_path.mkdir(parents=True)
    store = FhirStore(settings.storage.resolved_database_url())
    app = create_app(settings, store=store, dispatcher=None, audit=False)

    def self_link(client_ip: str, headers: dict[str, str]) -> str:
        r = _client_from(app, client_ip).get("/fhir/DiagnosticReport", headers=headers)
        assert r.status_code == 200, r.text
        return str(r.json()["link"][0]["url"])

    xf = {"X-Forwarded-Host": "ris-gw.hospital.example", "X-Forwarded-Proto": "https"}
    fwd = {"Forwarded": 'for=192.0.2.7;host="ris-gw.hospital.example:8443";proto=https'}
    assert self_link("10.9.3.4", xf).startswith("https://ris-gw.hospital.example/fhir/")
    assert self_link("10.9.3.4", fwd).startswith("https://ris-gw.hospital.example:8443/fhir/")
    for untrusted in ("192.0.2.7", "10.8.3.4"):
        for headers in (xf, fwd):
            assert self_link(untrusted, headers).startswith("http://10.1.1.1:8080/fhir/")
    # a trusted proxy passing on a value that is not a host name is not followed either
    bad = {"X-Forwarded-Host": "evil.example/x?", "X-Forwarded-Proto": "javascript"}
    assert self_link("10.9.3.4", bad).startswith("http://10.1.1.1:8080/fhir/")
    store.close()

    configured = node_settings(tmp_path, base_url="https://fhir.hospital.example/fhir",
                               trusted_proxies=["10.9.0.0/16"])  # fmt: skip
    store = FhirStore(configured.storage.resolved_database_url())
    app = create_app(configured, store=store, dispatcher=None, audit=False)
    assert self_link("10.9.3.4", xf).startswith("https://fhir.hospital.example/fhir/")
    store.close()


def test_trusted_proxies_must_be_addresses_or_networks(tmp_path: Any) -> None:
    from node.settings import ConfigError

    with pytest.raises(ConfigError, match="trusted_proxies"):
        node_settings(tmp_path, trusted_proxies=["proxy.hospital.example"])


# ------------------------------------------------------------------- item 6: audit


def test_audit_events_name_the_patient_and_can_be_searched_by_it(node: Node) -> None:
    uid = node.studies["ACC-2"]
    with node.client("ris") as c:
        assert c.get(f"/DiagnosticReport/{report_id(uid)}").status_code == 200
        assert c.get(f"/ImagingStudy/{imaging_study_id(uid)}").status_code == 200
    seen = node.audit_events(**{"patient:identifier": f"{PATIENTS}|PAT-2"})
    reads = {
        x["what"]["reference"]
        for e in seen
        if e["subtype"][0]["code"] == "read"
        for x in e["entity"]
        if "reference" in x.get("what", {})
    }
    assert {f"DiagnosticReport/{report_id(uid)}", f"ImagingStudy/{imaging_study_id(uid)}"} <= reads
    event = seen[0]
    r4b_valid(event)
    (patient,) = [x for x in event["entity"] if x.get("role", {}).get("code") == "1"]
    assert patient["what"]["identifier"] == {"system": PATIENTS, "value": "PAT-2"}
    assert patient["type"]["code"] == "1"  # Person
    assert {e["id"] for e in node.audit_events(patient="Patient/PAT-2")} == {e["id"] for e in seen}
    others = node.audit_events(**{"patient:identifier": "PAT-1"})
    assert all(e["id"] not in {s["id"] for s in seen} for e in others)


def test_failed_reads_are_audited_with_the_resource_tried(node: Node) -> None:
    uid = node.studies["ACC-1"]
    tried = {
        ("reports", f"Observation/{imaging_study_id(uid)}-x"): 403,
        (None, f"DiagnosticReport/{report_id(uid)}"): 401,
        ("ris", "DiagnosticReport/no-such-report"): 404,
    }
    for (who, ref), status in tried.items():
        with node.client(who) as c:
            assert c.get(f"/{ref}").status_code == status
    for (_, ref), status in tried.items():
        events = [e for e in node.audit_events(entity=ref) if e["outcomeDesc"] == f"HTTP {status}"]
        assert events, ref
        r4b_valid(events[0])
        assert events[0]["outcome"] == "4"  # minor failure: the request was refused
        assert events[0]["subtype"][0]["code"] == "read"
        assert events[0]["action"] == "R"
