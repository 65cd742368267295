"""The FHIR API as a client sees it: a running server (uvicorn on a free loopback port),
httpx, searches, errors as OperationOutcome, bearer tokens and JWTs, AuditEvents, and
Subscription notifications to a real HTTP endpoint."""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from node.dispatch import DispatchError, InProcessDispatcher
from node.fhir.auth import Authenticator, Principal
from node.fhir.errors import FhirError
from node.fhir.followups import FollowupPublisher, create_followup, followup, unsent_followups
from node.fhir.projection import record_preread
from node.fhir.questions import Question, build_question, plain_ask_parameters
from node.fhir.resources import IdentifierSystems, imaging_study_id, report_id, validate
from node.fhir.server import ApiServer
from node.fhir.store import FhirStore
from node.fhir.subscriptions import SubscriptionNotifier, subscription_status
from node.ledger import StudyLedger, StudyState
from node.settings import AuthSettings, Settings, load_settings
from node.status import collect_status, render_status
from tests.peers import wait_for
from tests.test_fhir_resources import add_study, r4b_valid
from workers.followup import run_followup_by_id

ISSUER = "https://idp.hospital.example"
FHIR = {"Content-Type": "application/fhir+json"}
TOKENS = {
    "ris": ["system/DiagnosticReport.read", "system/Observation.read",
            "system/ImagingStudy.read", "system/Communication.read",
            "system/Communication.write", "system/Subscription.*", "system/Device.rs",
            "system/Provenance.read"],
    "observer": ["system/Observation.read"],
    "reader": ["system/*.read"],
    "auditor": ["system/AuditEvent.read"],
}  # fmt: skip


def token_config() -> list[dict[str, Any]]:
    return [
        {"name": name, "sha256": hashlib.sha256(f"{name}-secret".encode()).hexdigest(),
         "scopes": scopes}
        for name, scopes in TOKENS.items()
    ]  # fmt: skip


def bearer(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {name}-secret"}


@dataclass
class Api:
    server: ApiServer
    settings: Settings
    ledger: StudyLedger
    key: rsa.RSAPrivateKey
    studies: dict[str, str]  # accession -> study UID

    def client(self, who: str | None = "ris") -> httpx.Client:
        headers = bearer(who) if who else {}
        return httpx.Client(base_url=self.server.base_url, headers=headers, timeout=30)

    def jwt(self, scopes: str, *, exp: float | None = None, key: Any = None) -> str:
        claims = {"iss": ISSUER, "sub": "ris-app", "scope": scopes,
                  "exp": int(exp if exp is not None else time.time() + 300)}  # fmt: skip
        return jwt.encode(claims, key or self.key, algorithm="RS256", headers={"kid": "k1"})


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    tmp = tmp_path_factory.mktemp("fhir-api")
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    jwk.update(kid="k1", alg="RS256", use="sig")
    (tmp / "jwks.json").write_text(json.dumps({"keys": [jwk]}))
    settings = load_settings(
        None,
        storage={"data_dir": str(tmp / "var"), "min_free_mb": 0},
        api={"host": "127.0.0.1", "port": 0},
        engine={"name": "demo"},
        auth={"tokens": token_config(), "jwt_issuer": ISSUER,
              "jwks_file": str(tmp / "jwks.json")},
        fhir={"patient_id_system": "urn:oid:1.2.3.4", "accession_system": "urn:oid:1.2.3.5",
              "subscription_poll_seconds": 0.05, "subscription_backoff_base_seconds": 0.05,
              "subscription_backoff_max_seconds": 0.2, "subscription_max_attempts": 3,
              "respond_sync_timeout_seconds": 20},
    )  # fmt: skip
    settings.storage.data_path.mkdir(parents=True)
    ledger = StudyLedger(settings.storage.resolved_database_url())
    systems = IdentifierSystems("urn:oid:1.2.3.4", "urn:oid:1.2.3.5")
    studies = {}
    for n, date in enumerate(["20250110", "20250111", "20250112", "20250113", "20250114"]):
        accession = f"ACC-{n:04d}"
        studies[accession] = add_study(ledger, accession=accession, study_date=date)
    studies["ACC-OTHER"] = add_study(ledger, patient_id="PAT-0002", accession="ACC-OTHER")
    studies["ACC-QUEUED"] = add_study(ledger, accession="ACC-QUEUED", state=StudyState.QUEUED)
    for uid in studies.values():
        record_preread(ledger, uid, 1, systems=systems)
    dispatcher = InProcessDispatcher(lambda *_: None, run_followup_by_id(settings))
    server = ApiServer(settings, dispatcher=dispatcher)
    server.start()
    yield Api(server, settings, ledger, key, studies)
    server.stop()
    dispatcher.close()
    ledger.close()


def ids(bundle: dict[str, Any], rtype: str | None = None) -> list[str]:
    return [
        e["resource"]["id"]
        for e in bundle.get("entry", [])
        if rtype is None or e["resource"]["resourceType"] == rtype
    ]


def assert_outcome(response: httpx.Response, status: int, words: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/fhir+json")
    body = response.json()
    assert body["resourceType"] == "OperationOutcome"
    r4b_valid(body)
    assert words in body["issue"][0]["diagnostics"], body


# ----------------------------------------------------------------------------- reads


def test_report_is_found_by_accession_patient_and_order(api: Api) -> None:
    uid = api.studies["ACC-0002"]
    with api.client() as c:
        by_accession = c.get("/DiagnosticReport", params={"identifier": "ACC-0002"}).json()
        assert ids(by_accession) == [report_id(uid)]
        assert by_accession["type"] == "searchset" and by_accession["total"] == 1
        r4b_valid(by_accession)
        qualified = c.get("/DiagnosticReport", params={"identifier": "urn:oid:1.2.3.5|ACC-0002"})
        assert ids(qualified.json()) == [report_id(uid)]
        order = c.get("/DiagnosticReport", params={"based-on:identifier": "ACC-0002"}).json()
        assert ids(order) == [report_id(uid)]
        for key in ("patient.identifier", "subject:identifier", "patient:identifier"):
            other = c.get("/DiagnosticReport", params={key: "urn:oid:1.2.3.4|PAT-0002"}).json()
            assert ids(other) == [report_id(api.studies["ACC-OTHER"])], key
        read = c.get(f"/DiagnosticReport/{report_id(uid)}")
        assert read.status_code == 200 and read.headers["etag"] == 'W/"1"'
        assert read.json()["status"] == "preliminary"


def test_search_pages_follow_next_links(api: Api) -> None:
    seen: list[str] = []
    with api.client() as c:
        url: str | None = (
            "/DiagnosticReport?patient.identifier=PAT-0001&status=preliminary&_count=2"
        )
        pages = 0
        while url:
            bundle = c.get(url).json()
            assert bundle["total"] == 5
            seen += ids(bundle)
            url = next((link["url"] for link in bundle["link"] if link["relation"] == "next"), None)
            pages += 1
    assert pages == 3 and len(seen) == len(set(seen)) == 5


def test_status_date_and_include_searches(api: Api) -> None:
    with api.client() as c:
        registered = c.get("/DiagnosticReport", params={"status": "registered"}).json()
        assert ids(registered) == [report_id(api.studies["ACC-QUEUED"])]
        ranged = c.get("/DiagnosticReport", params=[("date", "ge2025-01-11"),
                                                     ("date", "le2025-01-12")]).json()  # fmt: skip
        assert sorted(ids(ranged)) == sorted(
            report_id(api.studies[a]) for a in ("ACC-0001", "ACC-0002")
        )
        bundle = c.get("/DiagnosticReport", params={
            "identifier": "ACC-0003", "_include": "DiagnosticReport:result"}).json()  # fmt: skip
        assert len(ids(bundle, "Observation")) == 2
        assert {e["search"]["mode"] for e in bundle["entry"]} == {"match", "include"}


def test_observations_by_derived_from_subject_and_code(api: Api) -> None:
    study = imaging_study_id(api.studies["ACC-0001"])
    with api.client() as c:
        derived = c.get("/Observation", params={"derived-from": f"ImagingStudy/{study}"}).json()
        assert derived["total"] == 2
        coded = c.get("/Observation", params={
            "derived-from": f"ImagingStudy/{study}",
            "code": "http://snomed.info/sct|27925004",
            "subject:identifier": "PAT-0001"}).json()  # fmt: skip
        assert coded["total"] == 2
        assert (
            c.get("/Observation", params={"code": "http://snomed.info/sct|4147007"}).json()["total"]
            == 0
        )
        uid = api.studies["ACC-0001"]
        by_uid = c.get("/ImagingStudy", params={"identifier": f"urn:dicom:uid|urn:oid:{uid}"})
        assert ids(by_uid.json()) == [study]


def test_metadata_is_public_and_matches_the_routes(api: Api) -> None:
    with api.client(None) as c:
        cs = c.get("/metadata")
        assert cs.status_code == 200 and cs.headers["content-type"] == "application/fhir+json"
        r4b_valid(cs.json())
        served = {r["type"] for r in cs.json()["rest"][0]["resource"]}
    with api.client("reader") as c:
        for rtype in served - {"OperationDefinition", "AuditEvent"}:
            assert c.get(f"/{rtype}", params={"_count": 1}).status_code == 200, rtype


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status", "words"),
    [
        ("GET", "/Patient", {}, 404, "unknown or unsupported resource type 'Patient'"),
        ("GET", "/DiagnosticReport?colour=blue", {}, 400, "unknown search parameter 'colour'"),
        ("GET", "/DiagnosticReport?date=yesterday", {}, 400, "is not a FHIR date"),
        ("GET", "/DiagnosticReport?_count=-1", {}, 400, "_count must be"),
        ("GET", "/DiagnosticReport/no-such-report", {}, 404, "is not known"),
        ("GET", "/DiagnosticReport/bad$id", {}, 400, "invalid request"),
        ("PUT", "/DiagnosticReport/x", {}, 405, "DiagnosticReport supports: read, search-type"),
        ("POST", "/Communication", {"content": b"{not json", "headers": FHIR}, 400,
         "not valid JSON"),
        ("POST", "/Communication", {"content": b"{}", "headers": {"Content-Type": "text/plain"}},
         415, "must be application/fhir+json"),
        ("POST", "/Communication", {"json": {"resourceType": "Patient"}, "headers": FHIR}, 400,
         "must be a Communication resource"),
        ("POST", "/Communication", {"json": {"resourceType": "Communication", "status": "x",
                                             "sent": "not a date"}, "headers": FHIR},
         400, "invalid Communication"),
        ("POST", "/Communication", {"content": b"x" * 2_000_000, "headers": FHIR}, 413,
         "larger than 1048576 bytes"),
        ("GET", "/DiagnosticReport", {"headers": {"Accept": "application/fhir+xml"}}, 406,
         "answers application/fhir+json only"),
    ],
)  # fmt: skip
def test_every_error_is_an_operation_outcome(
    api: Api, method: str, path: str, kwargs: dict[str, Any], status: int, words: str
) -> None:
    with api.client() as c:
        assert_outcome(c.request(method, path, **kwargs), status, words)


def test_unknown_parameter_is_ignored_when_the_client_asks_for_leniency(api: Api) -> None:
    with api.client() as c:
        r = c.get("/DiagnosticReport?colour=blue&_count=1", headers={"Prefer": "handling=lenient"})
        assert r.status_code == 200 and r.json()["total"] == 7


# ----------------------------------------------------------------------------- security


def test_no_token_is_401_with_a_bearer_challenge(api: Api) -> None:
    with api.client(None) as c:
        r = c.get("/DiagnosticReport")
        assert_outcome(r, 401, "bearer token is required")
        assert r.headers["www-authenticate"].startswith('Bearer realm="medgemma-node"')
        assert_outcome(
            c.get("/DiagnosticReport", headers={"Authorization": "Bearer guessed"}), 401,
            "unknown bearer token",
        )  # fmt: skip
        assert_outcome(
            c.get("/DiagnosticReport", headers={"Authorization": "Basic dXNlcjpwdw=="}), 401,
            "must be 'Bearer <token>'",
        )  # fmt: skip


def test_a_token_without_the_scope_is_403(api: Api) -> None:
    with api.client("observer") as c:
        assert c.get("/Observation").status_code == 200
        assert_outcome(
            c.get("/DiagnosticReport"), 403, "needs the scope system/DiagnosticReport.read"
        )
        report = report_id(api.studies["ACC-0001"])
        ask = {"resourceType": "Parameters",
               "parameter": [{"name": "question", "valueString": "?"}]}  # fmt: skip
        assert_outcome(c.post(f"/DiagnosticReport/{report}/$ask", json=ask, headers=FHIR), 403,
                       "system/Communication.write")  # fmt: skip


def test_jwts_are_checked_against_the_issuers_keys(api: Api) -> None:
    other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cases = [
        (api.jwt("system/DiagnosticReport.read"), 200, ""),
        (api.jwt("system/DiagnosticReport.read", key=other_key), 401, "signature does not verify"),
        (api.jwt("system/DiagnosticReport.read", exp=time.time() - 3600), 401, "has expired"),
        (api.jwt("system/Observation.read"), 403, "needs the scope"),
        (jwt.encode({"iss": "https://evil.example", "exp": int(time.time()) + 60}, api.key,
                    algorithm="RS256", headers={"kid": "k1"}), 401, "issuer"),
    ]  # fmt: skip
    with api.client(None) as c:
        for token, status, words in cases:
            r = c.get("/DiagnosticReport", headers={"Authorization": f"Bearer {token}"})
            if status == 200:
                assert r.status_code == 200, r.text
            else:
                assert_outcome(r, status, words)


def test_audit_events_record_accesses_and_need_the_admin_scope(api: Api) -> None:
    with api.client("reader") as c:
        c.get("/DiagnosticReport", params={"identifier": "ACC-0004"})
        assert_outcome(c.get("/AuditEvent"), 403, "wildcards do not grant AuditEvent")
    with api.client(None) as c:
        c.get("/Observation")  # a refused access is audited too
    assert api.server.app.state.audit.flush()
    with api.client("auditor") as c:
        events = c.get("/AuditEvent", params={"_count": 200}).json()
    resources = [e["resource"] for e in events["entry"]]
    for event in resources[:5]:
        r4b_valid(event)
    search = next(
        e for e in resources
        if e["agent"][0]["who"].get("identifier", {}).get("value") == "reader"
        and e["subtype"][0]["code"] == "search-type" and e["outcomeDesc"] == "HTTP 200"
    )  # fmt: skip
    assert search["outcome"] == "0"
    assert any(x.get("what", {}).get("reference", "").startswith("DiagnosticReport/")
               for x in search["entity"])  # fmt: skip
    refused = [e for e in resources if e["outcomeDesc"] == "HTTP 401"]
    assert refused and refused[0]["agent"][0]["who"] == {"display": "unauthenticated client"}


def test_logs_carry_request_ids_never_patient_identifiers(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO), api.client() as c:
        r = c.get("/DiagnosticReport", params={"patient.identifier": "PAT-0001",
                                               "identifier": "ACC-0001"})  # fmt: skip
        assert r.status_code == 200
        request_id = r.headers["x-request-id"]

        def node_lines() -> str:
            # the node's own lines (httpx's are this test's client, the RIS side)
            return "\n".join(
                rec.getMessage() for rec in caplog.records if not rec.name.startswith("httpx")
            )

        # the access line is written after the response is sent: wait for it
        wait_for(lambda: request_id in node_lines(), 10, what="the access log line")
    assert "PAT-0001" not in node_lines() and "ACC-0001" not in node_lines()


# ----------------------------------------------------------------------------- follow-ups


def test_questions_about_unknown_anchors_or_unready_reports_are_refused(api: Api) -> None:
    ready = report_id(api.studies["ACC-0001"])
    queued = report_id(api.studies["ACC-QUEUED"])

    def ask(report: str, *params: dict[str, Any]) -> httpx.Response:
        body = {"resourceType": "Parameters", "parameter": list(params)}
        with api.client() as c:
            return c.post(f"/DiagnosticReport/{report}/$ask", json=body, headers=FHIR)

    q = {"name": "question", "valueString": "Is it growing?"}
    assert_outcome(ask(ready, q, {"name": "anchor", "valueString": "A9"}), 422,
                   "has no anchor 'A9'; its anchors: A1, A2")  # fmt: skip
    assert_outcome(ask(queued, q), 422, "is registered")
    assert_outcome(ask(ready), 400, "needs the parameter 'question'")
    assert_outcome(ask(ready, q, {"name": "colour", "valueString": "x"}), 400, "unknown parameter")
    assert_outcome(ask("no-such-report", q), 404, "is not known")


def test_malformed_ask_bodies_are_refused_with_an_outcome_naming_the_problem(api: Api) -> None:
    ready = report_id(api.studies["ACC-0001"])

    def post(body: Any) -> httpx.Response:
        with api.client() as c:
            return c.post(f"/DiagnosticReport/{ready}/$ask", json=body, headers=FHIR)

    def ask(*params: Any) -> httpx.Response:
        return post({"resourceType": "Parameters", "parameter": list(params)})

    q = {"name": "question", "valueString": "Is it growing?"}
    assert_outcome(post({"resourceType": "Bundle", "parameter": [q]}), 400,
                   "must be a Parameters resource")  # fmt: skip
    assert_outcome(ask(q, {"name": "question", "valueString": "And the other?"}), 400,
                   "parameter 'question' of $ask may be given once")  # fmt: skip
    anchors = [{"name": "anchor", "valueString": a} for a in ("A1", "A2")]
    assert_outcome(ask(q, *anchors), 400, "may be given once")
    assert_outcome(ask({"name": "question", "valueInteger": 5}), 400, "must be a valueString")
    assert_outcome(ask({"name": "question", "valueString": 5}), 400, "invalid Parameters")
    assert_outcome(ask({"name": "question", "valueString": ""}), 400, "invalid Parameters")
    assert_outcome(ask({"name": "question", "valueString": "x", "valueCode": "x"}), 400,
                   "invalid Parameters")  # fmt: skip
    assert_outcome(ask({**q, "colour": "red"}), 400, "invalid Parameters")
    assert_outcome(post({"resourceType": "Parameters", "parameter": "Is it growing?"}), 400,
                   "invalid Parameters")  # fmt: skip
    assert_outcome(ask({"name": "colour", "valueString": "x"}, q), 400, "unknown parameter")
    assert_outcome(ask({"name": "question", "valueString": "x" * 4001}), 422,
                   "longer than 4000 characters")  # fmt: skip
    assert_outcome(ask({"name": "question", "valueString": "   "}), 422, "the question is empty")
    assert_outcome(ask(q, {"name": "language", "valueCode": "tlh"}), 422, "is not supported")
    assert_outcome(ask(q, {"name": "anchor", "valueReference": {"display": "A1"}}), 400,
                   "must be a valueReference or valueString")  # fmt: skip
    # the plain shape and the model's extras are both accepted
    anchor = {"name": "anchor", "valueReference": {"reference": "A1", "display": "nodule"}}
    fine = [q, {"name": "language", "valueCode": "en"}, anchor]
    accepted = post({"resourceType": "Parameters", "id": "p1", "parameter": fine})
    assert accepted.status_code == 202, accepted.text


def test_ask_bodies_that_skip_the_model_are_all_valid_parameters() -> None:
    """The plain shape (:func:`plain_ask_parameters`) accepts only what the fhir.resources
    model accepts: skipping it never lets an invalid resource through."""
    q = {"name": "question", "valueString": "How large is A1?"}
    plain = [
        [q],
        [q, {"name": "anchor", "valueString": "A1"}, {"name": "language", "valueCode": "zh-CN"}],
        [{"name": "anchor", "valueReference": {"reference": "Observation/x"}}, q],
        [{"name": "language", "valueString": "en"}, {**q, "valueString": " x\n\ty "}],
    ]
    for params in plain:
        body = {"resourceType": "Parameters", "parameter": params}
        assert plain_ask_parameters(body), body
        validate(body)  # the model accepts it
    not_plain: list[Any] = [
        [], "x", [q, "x"], [{**q, "valueString": ""}], [{**q, "valueString": "\u2003"}],
        [{**q, "valueString": 5}], [{**q, "valueCode": "x"}], [{"name": "question"}],
        [{"name": "colour", "valueString": "x"}], [{"name": "question", "valueInteger": 1}],
        [{"name": "language", "valueCode": "not a code"}],
        [{"name": "anchor", "valueReference": {"reference": "A1", "display": "d"}}],
        [{"name": "anchor", "valueReference": {"reference": ""}}],
        [{**q, "extension": []}],
    ]  # fmt: skip
    for params in not_plain:
        assert not plain_ask_parameters({"resourceType": "Parameters", "parameter": params})
    for extra in ({"id": "x"}, {"meta": {}}, {"text": {}}):
        assert not plain_ask_parameters({"resourceType": "Parameters", "parameter": [q], **extra})


def test_respond_sync_answers_with_the_communication_about_the_anchor(api: Api) -> None:
    report = report_id(api.studies["ACC-0001"])
    body = {"resourceType": "Parameters", "parameter": [
        {"name": "question", "valueString": "How big is A2?"}]}  # fmt: skip
    with api.client() as c:
        r = c.post(f"/DiagnosticReport/{report}/$ask", json=body,
                   headers={**FHIR, "Prefer": "respond-sync"})  # fmt: skip
        assert r.status_code == 200, r.text
        bundle = r.json()
        r4b_valid(bundle)
        answer = bundle["entry"][0]["resource"]
        assert r.headers["location"].endswith(f"/Communication/{answer['id']}")
        assert answer["category"][0]["coding"][0]["code"] == "answer"
        # a size is answered from the anchor's geometry and the pixel spacing (40 px x 0.2 mm)
        text = answer["payload"][0]["contentString"]
        assert "A2 (left lower zone nodule), 8.0 x 8.0 mm" in text
        assert "DEMO - not for clinical use" in text
        about = [a["reference"] for a in answer["about"]]
        assert about[0] == f"DiagnosticReport/{report}"
        (a2,) = [
            e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Observation"
        ]
        assert any(i["value"] == "A2" for i in a2["identifier"])
        question = c.get("/" + answer["inResponseTo"][0]["reference"])
        assert question.json()["status"] == "completed"
    # the question carries its study, so it can be routed to the worker holding the study's
    # image work (before, questions asked through the API were never routed)
    job = followup(FhirStore(api.ledger), question.json()["id"])
    assert job is not None and job.study_uid == api.studies["ACC-0001"]


# ----------------------------------------------------------------------------- subscriptions


class Receiver:
    """A RIS-like HTTP endpoint that records notifications; fails the first ``fail`` ones."""

    def __init__(self, fail: int = 0, status: int = 503) -> None:
        self.calls: list[tuple[str, str, bytes, dict[str, str]]] = []
        self.fail = fail
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _handle(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                outer.calls.append((self.command, self.path, body, dict(self.headers)))
                code = status if len(outer.calls) <= outer.fail else 200
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_POST = do_PUT = _handle

            def log_message(self, *args: Any) -> None:
                pass

        Handler.protocol_version = "HTTP/1.1"
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/ris/hook"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def subscribe(c: httpx.Client, criteria: str, endpoint: str, payload: str = "") -> dict[str, Any]:
    channel = {"type": "rest-hook", "endpoint": endpoint,
               "header": ["Authorization: Bearer ris-inbox"]}  # fmt: skip
    body: dict[str, Any] = {"resourceType": "Subscription", "status": "requested",
                            "reason": "RIS inbox", "criteria": criteria,
                            "channel": channel}  # fmt: skip
    if payload:
        body["channel"]["payload"] = payload
    r = c.post("/Subscription", json=body, headers=FHIR)
    assert r.status_code == 201, r.text
    sub: dict[str, Any] = r.json()
    assert sub["status"] == "active" and sub["channel"]["header"] == ["Authorization: ***"]
    return sub


def test_rest_hook_notifies_with_retries_and_dead_deliveries_show_in_status(api: Api) -> None:
    flaky = Receiver(fail=1)
    dead = Receiver(fail=100, status=500)
    api.settings.fhir.subscription_allowed_endpoints[:] = [flaky.url, dead.url]
    try:
        with api.client() as c:
            subscribe(c, "DiagnosticReport?status=preliminary", flaky.url, "application/fhir+json")
            broken = subscribe(
                c, "DiagnosticReport?status=preliminary&identifier=ACC-NEW", dead.url
            )
            assert_outcome(c.post("/Subscription", json={
                "resourceType": "Subscription", "status": "requested", "reason": "x",
                "criteria": "Patient?name=x", "channel": {"type": "rest-hook",
                                                        "endpoint": flaky.url}}, headers=FHIR),
                400, "criteria must start with")  # fmt: skip
            # a new pre-read: the report is written as preliminary -> both subscriptions fire
            uid = add_study(api.ledger, accession="ACC-NEW")
            record_preread(api.ledger, uid, 1, systems=IdentifierSystems("", ""))
            # the first attempt fails (503) and is retried after a backoff
            wait_for(lambda: len(flaky.calls) >= 2, 15, what="a retried notification")
            for method, path, body, headers in flaky.calls:
                assert (method, path) == ("PUT", f"/ris/hook/DiagnosticReport/{report_id(uid)}")
                assert headers["Authorization"] == "Bearer ris-inbox"
                assert json.loads(body)["status"] == "preliminary"
            wait_for(
                lambda: c.get(f"/Subscription/{broken['id']}").json()["status"] == "error",
                15, what="the broken Subscription in error",
            )  # fmt: skip
            time.sleep(0.3)
            assert len(flaky.calls) == 2  # delivered: no further attempts
            assert len(dead.calls) == 3 and all(x[0] == "POST" and not x[2] for x in dead.calls)
            assert "HTTP 500" in c.get(f"/Subscription/{broken['id']}").json()["error"]
    finally:
        flaky.close()
        dead.close()
    status = collect_status(api.settings, probe=lambda s: _down())
    assert status.notifications["dead"] >= 1 and status.notifications["delivered"] >= 1
    text = render_status(status)
    assert f"DEAD notification of Subscription/{broken['id']}" in text and "HTTP 500" in text


def test_two_api_processes_send_each_notification_once(tmp_path: Path) -> None:
    """Two notifiers (as in two API processes, each with its own engine) on one database:
    every new report version reaches the RIS exactly once."""
    url = f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
    ledger = StudyLedger(url)
    receiver = Receiver()
    stores = [FhirStore(url), FhirStore(url)]
    stores[0].put({"resourceType": "Subscription", "id": "ris-inbox", "status": "active",
                   "reason": "RIS inbox", "criteria": "DiagnosticReport?status=preliminary",
                   "channel": {"type": "rest-hook", "endpoint": receiver.url,
                               "payload": "application/fhir+json"}})  # fmt: skip
    uids = [add_study(ledger, accession=f"ACC-{n:04d}") for n in range(30)]
    for uid in uids:
        record_preread(ledger, uid, 1, systems=IdentifierSystems())
    settings = load_settings(
        None,
        fhir={"subscription_poll_seconds": 0.01, "subscription_allowed_endpoints": [receiver.url]},
    ).fhir
    notifiers = [SubscriptionNotifier(store, settings) for store in stores]
    for notifier in notifiers:
        notifier.start()
    try:
        wait_for(lambda: len(receiver.calls) >= len(uids), 30, what="every notification")
        time.sleep(0.5)  # a duplicate would arrive now
    finally:
        for notifier in notifiers:
            notifier.stop()
        receiver.close()
    paths = sorted(path for _, path, _, _ in receiver.calls)
    assert paths == sorted(f"/ris/hook/DiagnosticReport/{report_id(uid)}" for uid in uids)
    counts, dead = subscription_status(stores[0])
    assert counts["delivered"] == len(uids) and counts["pending"] == 0 and not dead
    for store in stores:
        store.close()
    ledger.close()


def _down() -> Any:
    from node.status import ScpProbe

    return ScpProbe(False, "not started in this test")


class FlakyDispatcher:
    """A work queue that is down for the first ``down`` sends."""

    def __init__(self, down: int) -> None:
        self.down = down
        self.sent: list[str] = []

    def send_followup(self, question_id: str) -> str:
        if self.down > 0:
            self.down -= 1
            raise DispatchError("broker redis://***@127.0.0.1:9/0 unavailable")
        self.sent.append(question_id)
        return question_id

    def send_preread(self, study_uid: str, version: int) -> str:
        return ""

    def queue_depth(self) -> int | None:
        return None

    def close(self) -> None:
        pass


def test_questions_wait_out_a_broker_outage_and_unsent_ones_are_found_again(
    tmp_path: Path,
) -> None:
    ledger = StudyLedger(f"sqlite:///{tmp_path / 'ledger.sqlite3'}")
    store = FhirStore(ledger)
    uid = add_study(ledger)
    record_preread(ledger, uid, 1, systems=IdentifierSystems())
    report = store.get("DiagnosticReport", report_id(uid))
    assert report is not None
    principal = Principal("ris", "token", frozenset())
    jobs = [
        create_followup(
            store,
            build_question(report, Question(f"question {n}", "", ""), "", principal),
            report_id=report.id,
            study_uid="",
            language="",
            anchor_ref="",
        )
        for n in range(3)
    ]
    dispatcher = FlakyDispatcher(down=2)
    # questions 1 and 2 were stored but never handed over (a crash before publishing):
    # the publisher finds them when it starts; question 0 arrives during the outage
    assert sorted(unsent_followups(store, 0)) == sorted(j.id for j in jobs)
    publisher = FollowupPublisher(store, dispatcher, retry_base=0.05, unsent_after=0)
    try:
        publisher.publish(jobs[0].id)
        wait_for(
            lambda: sorted(dispatcher.sent) == sorted(j.id for j in jobs), 15,
            what="every question sent",
        )  # fmt: skip
        assert dispatcher.down == 0  # both failed sends were retried
        wait_for(lambda: unsent_followups(store, 0) == [], 15, what="no unsent question")
    finally:
        publisher.close()
        ledger.close()


def test_jwt_keys_can_come_from_the_issuers_jwks_url(api: Api) -> None:
    jwks = (Path(api.settings.auth.jwks_file)).read_bytes()

    class Keys(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(jwks)))
            self.end_headers()
            self.wfile.write(jwks)

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Keys)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/.well-known/jwks.json"
        auth = Authenticator(AuthSettings(jwt_issuer=ISSUER, jwks_url=url))
        principal = auth.authenticate(f"Bearer {api.jwt('system/DiagnosticReport.read')}")
        assert principal.kind == "jwt" and principal.name == "ris-app"
        assert principal.allows("DiagnosticReport", "s")
        assert not principal.allows("Communication", "c")
        other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        with pytest.raises(FhirError) as refused:
            auth.authenticate(f"Bearer {api.jwt('system/*.read', key=other)}")
        assert refused.value.status == 401
    finally:
        httpd.shutdown()
        httpd.server_close()
