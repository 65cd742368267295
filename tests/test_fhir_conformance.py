"""FHIR conformance as integration engines and client libraries expect it (issue 10, items 9
and 10): lenient self links, _lastUpdated, _sort, _summary=count, _revinclude, POST _search,
paging that stays stable while reports are written, vread and _history, If-None-Match,
Allow on 405, a CapabilityStatement that says exactly what works, SMART discovery."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from node.dispatch import InProcessDispatcher
from node.fhir.projection import record_preread
from node.fhir.resources import IdentifierSystems, report_id
from node.fhir.server import ApiServer
from node.ledger import StudyLedger, StudyState
from node.settings import Settings, load_settings
from tests.results import make_anchors, make_result
from tests.test_fhir_api import FHIR, assert_outcome, bearer, ids, token_config
from tests.test_fhir_resources import add_study, r4b_valid
from workers.followup import run_followup_by_id

SYSTEMS = IdentifierSystems("urn:oid:1.2.3.4", "urn:oid:1.2.3.5")
ISSUER = "https://idp.hospital.example"
EXTRA_TOKENS = {
    "reports": ["system/DiagnosticReport.read"],
    "all": ["system/*.*", "system/AuditEvent.read"],
}
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


@dataclass
class Node:
    server: ApiServer
    settings: Settings
    ledger: StudyLedger
    studies: dict[str, str]  # accession -> study UID

    def client(self, who: str | None = "ris") -> httpx.Client:
        headers = bearer(who) if who else {}
        return httpx.Client(base_url=self.server.base_url, headers=headers, timeout=30)

    def report(self, accession: str, patient_id: str, date: str = "20250120") -> str:
        """A new pre-read (a new preliminary DiagnosticReport); returns the report id."""
        uid = add_study(self.ledger, patient_id=patient_id, accession=accession, study_date=date)
        record_preread(self.ledger, uid, 1, systems=SYSTEMS)
        self.studies[accession] = uid
        return report_id(uid)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    tmp = tmp_path_factory.mktemp("fhir-conformance")
    tokens = token_config() + [
        {"name": n, "sha256": hashlib.sha256(f"{n}-secret".encode()).hexdigest(), "scopes": s}
        for n, s in EXTRA_TOKENS.items()
    ]
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    (tmp / "jwks.json").write_text(json.dumps({"keys": [{**jwk, "kid": "k1"}]}))
    settings = load_settings(
        None,
        storage={"data_dir": str(tmp / "var"), "min_free_mb": 0},
        api={"host": "127.0.0.1", "port": 0},
        engine={"name": "demo"},
        auth={"tokens": tokens, "jwt_issuer": ISSUER, "jwks_file": str(tmp / "jwks.json"),
              "token_endpoint": f"{ISSUER}/oauth2/token"},
        fhir={"patient_id_system": SYSTEMS.patient_id, "accession_system": SYSTEMS.accession,
              "respond_sync_timeout_seconds": 20},
    )  # fmt: skip
    settings.storage.data_path.mkdir(parents=True)
    ledger = StudyLedger(settings.storage.resolved_database_url())
    studies = {}
    for n, date in enumerate(["20250110", "20250111", "20250112", "20250113"]):
        accession = f"ACC-{n:04d}"
        studies[accession] = add_study(ledger, accession=accession, study_date=date)
        record_preread(ledger, studies[accession], 1, systems=SYSTEMS)
    dispatcher = InProcessDispatcher(lambda *_: None, run_followup_by_id(settings))
    server = ApiServer(settings, dispatcher=dispatcher)
    server.start()
    yield Node(server, settings, ledger, studies)
    server.stop()
    dispatcher.close()
    ledger.close()


def link(bundle: dict[str, Any], relation: str) -> str | None:
    return next((x["url"] for x in bundle["link"] if x["relation"] == relation), None)


def query_of(url: str) -> list[tuple[str, str]]:
    return parse_qsl(urlsplit(url).query)


# ----------------------------------------------------------------------------- item 9


def test_lenient_self_link_shows_only_the_parameters_applied(node: Node) -> None:
    with node.client() as c:
        r = c.get(
            "/DiagnosticReport",
            params={"colour": "blue", "status": "preliminary", "_count": "2"},
            headers={"Prefer": "handling=lenient"},
        )
        assert r.status_code == 200, r.text
        self_query = query_of(link(r.json(), "self") or "")
        assert ("status", "preliminary") in self_query and ("_count", "2") in self_query
        assert "colour" not in dict(self_query)


def test_last_updated_filters_with_prefixes(node: Node) -> None:
    rid = report_id(node.studies["ACC-0002"])
    with node.client() as c:
        report = c.get(f"/DiagnosticReport/{rid}").json()
        changed = datetime.fromisoformat(report["meta"]["lastUpdated"].replace("Z", "+00:00"))
        second = changed.replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")
        before = (changed - timedelta(seconds=2)).strftime("%Y-%m-%dT%H:%M:%SZ")
        later = (datetime.now(UTC) + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")

        def found(value: str) -> bool:
            r = c.get("/DiagnosticReport", params={"_id": rid, "_lastUpdated": value})
            assert r.status_code == 200, r.text
            return rid in ids(r.json())

        assert found(f"ge{second}") and found(f"le{second}") and found(f"gt{before}")
        assert not found(f"lt{second}") and not found(f"gt{later}") and found(f"lt{later}")
        assert_outcome(
            c.get("/DiagnosticReport", params={"_lastUpdated": "gt-yesterday"}), 400,
            "is not a FHIR date",
        )  # fmt: skip


def test_sort_by_date_and_last_updated(node: Node) -> None:
    mine = [report_id(node.studies[f"ACC-{n:04d}"]) for n in range(4)]  # dates ascending
    with node.client() as c:

        def order(sort: str) -> list[str]:
            params = {"_sort": sort, "_count": "100", "patient.identifier": "PAT-0001"}
            got = ids(c.get("/DiagnosticReport", params=params).json())
            return [i for i in got if i in mine]

        assert order("date") == mine
        assert order("-date") == mine[::-1]
        assert order("_lastUpdated") == order("-_lastUpdated")[::-1]
        assert_outcome(c.get("/DiagnosticReport", params={"_sort": "status"}), 400,
                       "_sort='status' is not supported")  # fmt: skip


def test_summary_count_answers_the_total_only(node: Node) -> None:
    with node.client() as c:
        full = c.get("/DiagnosticReport", params={"_count": "100"}).json()
        counted = c.get("/DiagnosticReport", params={"_summary": "count"}).json()
        r4b_valid(counted)
        assert counted["total"] == full["total"] > 0 and "entry" not in counted
        assert link(counted, "next") is None


def test_revinclude_provenance_is_scope_checked(node: Node) -> None:
    rid = report_id(node.studies["ACC-0001"])
    params = {"_id": rid, "_revinclude": "Provenance:target"}
    with node.client() as c:
        bundle = c.get("/DiagnosticReport", params=params).json()
        r4b_valid(bundle)
        provenance = [e for e in bundle["entry"] if e["resource"]["resourceType"] == "Provenance"]
        assert provenance and all(e["search"]["mode"] == "include" for e in provenance)
        assert any(t["reference"] == f"DiagnosticReport/{rid}"
                   for t in provenance[0]["resource"]["target"])  # fmt: skip
        assert_outcome(c.get("/DiagnosticReport", params={"_revinclude": "Device:x"}), 400,
                       "_revinclude='Device:x' is not supported")  # fmt: skip
    with node.client("reports") as c:
        bundle = c.get("/DiagnosticReport", params=params).json()
        assert ids(bundle, "Provenance") == [] and ids(bundle, "DiagnosticReport") == [rid]
        outcome = [e for e in bundle["entry"] if e["search"]["mode"] == "outcome"]
        assert (
            "Provenance resources were left out"
            in outcome[0]["resource"]["issue"][0]["diagnostics"]
        )


def test_post_search_answers_as_get(node: Node) -> None:
    query = {"status": "preliminary", "_count": "2", "_sort": "date"}
    with node.client() as c:
        got = c.get("/DiagnosticReport", params=query).json()
        posted = c.post("/DiagnosticReport/_search", data=query)
        assert posted.status_code == 200, posted.text
        assert ids(posted.json()) == ids(got) and posted.json()["total"] == got["total"]
        assert dict(query_of(link(posted.json(), "self") or "")) == query
        assert_outcome(c.post("/DiagnosticReport/_search", json=query, headers=FHIR), 415,
                       "application/x-www-form-urlencoded")  # fmt: skip
    with node.client(None) as c:
        assert c.post("/DiagnosticReport/_search", data=query).status_code == 401


def test_paging_neither_repeats_nor_skips_while_reports_arrive(node: Node) -> None:
    before = {node.report(f"PAGE-{n}", "PAT-PAGE") for n in range(5)}
    seen: list[str] = []
    with node.client() as c:
        url: str | None = "/DiagnosticReport?patient.identifier=PAT-PAGE&_count=2"
        n = 0
        while url:
            bundle = c.get(url).json()
            assert bundle["total"] == 5
            seen += ids(bundle)
            node.report(f"PAGE-NEW-{n}", "PAT-PAGE")  # newer reports on top, between pages
            n += 1
            url = link(bundle, "next")
    assert len(seen) == len(set(seen)) and set(seen) == before
    with node.client() as c:
        assert_outcome(c.get("/DiagnosticReport", params={"_cursor": "bm90IGEgY3Vyc29y"}), 400,
                       "_cursor is not a paging token")  # fmt: skip


# ----------------------------------------------------------------------------- item 10


def test_history_and_vread_follow_a_report_through_its_versions(node: Node) -> None:
    ledger = node.ledger
    uid = add_study(ledger, accession="ACC-HIST", state=StudyState.QUEUED)
    record_preread(ledger, uid, 1, systems=SYSTEMS)  # registered
    ledger.start_run(uid, 1)
    result = make_result(make_anchors())
    ledger.finish(uid, 1, ok=True, result=result)
    ledger.save_anchors(uid, 1, result.anchors)
    record_preread(ledger, uid, 1, systems=SYSTEMS)  # preliminary
    done = ledger.get_study(uid)
    assert done is not None and done.result is not None
    a1 = done.result.anchor("A1")
    assert a1 is not None
    refined = a1.refined(turn=1, attributes={"margin": "lobulated"})
    amendment = replace(
        done.result.with_anchors([refined, *(a for a in done.result.anchors if a is not a1)]),
        revision=1,
    )
    assert ledger.amend_result(uid, 1, amendment, [refined])
    record_preread(ledger, uid, 1, systems=SYSTEMS)  # amended
    rid = report_id(uid)
    with node.client() as c:
        history = c.get(f"/DiagnosticReport/{rid}/_history")
        assert history.status_code == 200, history.text
        bundle = history.json()
        r4b_valid(bundle)
        assert bundle["type"] == "history" and bundle["total"] == 3
        statuses = [e["resource"]["status"] for e in bundle["entry"]]
        assert statuses == ["amended", "preliminary", "registered"]
        assert [e["request"]["method"] for e in bundle["entry"]] == ["PUT", "PUT", "POST"]
        for version, status in ((1, "registered"), (2, "preliminary"), (3, "amended")):
            r = c.get(f"/DiagnosticReport/{rid}/_history/{version}")
            assert r.status_code == 200, r.text
            assert r.json()["status"] == status and r.headers["etag"] == f'W/"{version}"'
            assert r.json()["meta"]["versionId"] == str(version)
        assert_outcome(c.get(f"/DiagnosticReport/{rid}/_history/9"), 404, "has no version 9")
        assert_outcome(c.get("/DiagnosticReport/nothing/_history"), 404, "is not known")
    with node.client("observer") as c:
        assert c.get(f"/DiagnosticReport/{rid}/_history/1").status_code == 403


def test_if_none_match_answers_304(node: Node) -> None:
    rid = report_id(node.studies["ACC-0000"])
    with node.client() as c:
        first = c.get(f"/DiagnosticReport/{rid}")
        etag = first.headers["etag"]
        again = c.get(f"/DiagnosticReport/{rid}", headers={"If-None-Match": etag})
        assert again.status_code == 304 and again.content == b""
        assert again.headers["etag"] == etag
        other = c.get(f"/DiagnosticReport/{rid}", headers={"If-None-Match": 'W/"999"'})
        assert other.status_code == 200 and other.json()["id"] == rid


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("PUT", "/DiagnosticReport/x", "GET"),
        ("POST", "/DiagnosticReport", "GET"),
        ("DELETE", "/Communication", "GET, POST"),
        ("DELETE", "/Observation/x/_history/1", "GET"),
        ("POST", "/metadata", "GET"),
    ],
)
def test_405_names_the_allowed_methods(node: Node, method: str, path: str, allow: str) -> None:
    with node.client() as c:
        r = c.request(method, path)
        assert_outcome(r, 405, "not supported")
        assert r.headers["allow"] == allow


SAMPLES = {"token": "x", "date": "ge2020-01-01", "special": "x"}


def test_every_advertised_parameter_and_interaction_works(node: Node) -> None:
    """Walk the CapabilityStatement: every search parameter, include, revinclude and
    interaction it lists is accepted (never a 400 or a 500)."""
    with node.client(None) as c:
        cs = c.get("/metadata").json()
    problems = []
    with node.client("all") as c:
        for resource in cs["rest"][0]["resource"]:
            rtype = resource["type"]
            interactions = [i["code"] for i in resource["interaction"]]
            if "search-type" in interactions:
                any_match = c.get(f"/{rtype}", params={"_count": "1"}).json()
                some_id = ids(any_match)[0] if any_match.get("entry") else None
                queries: list[dict[str, str]] = []
                for p in resource.get("searchParam", []):
                    value = SAMPLES.get(p["type"])
                    if p["type"] == "reference":
                        value = "Patient/PAT-0001" if p["name"] in ("subject", "patient") else (
                            f"{rtype}/x")  # fmt: skip
                    queries.append({p["name"]: value or "x"})
                queries += [{"_include": v} for v in resource.get("searchInclude", [])]
                queries += [{"_revinclude": v} for v in resource.get("searchRevInclude", [])]
                queries += [{"_sort": "-_lastUpdated"}, {"_summary": "count"}]
                for q in queries:
                    tries = [c.get(f"/{rtype}", params=q)]
                    if rtype != "Subscription":  # its searches are the caller's own: GET only
                        tries.append(c.post(f"/{rtype}/_search", data=q))
                    for r in tries:
                        if r.status_code >= 400:
                            problems.append((rtype, q, r.status_code, r.text[:200]))
            else:
                some_id = "DiagnosticReport-ask" if rtype == "OperationDefinition" else None
            if some_id is None:
                continue
            paths = {"read": f"/{rtype}/{some_id}"}
            if "vread" in interactions:
                paths["vread"] = f"/{rtype}/{some_id}/_history/1"
            if "history-instance" in interactions:
                paths["history-instance"] = f"/{rtype}/{some_id}/_history"
            for interaction, path in paths.items():
                r = c.get(path)
                if r.status_code != 200:
                    problems.append((rtype, interaction, r.status_code, r.text[:200]))
    assert problems == []


def test_smart_configuration_is_public_and_true(node: Node) -> None:
    with httpx.Client(base_url=node.server.base_url.removesuffix("/fhir")) as c:
        root = c.get("/.well-known/smart-configuration")
    with node.client(None) as c:
        under_base = c.get("/.well-known/smart-configuration")
    for r in (root, under_base):
        assert r.status_code == 200, r.text
        config = r.json()
        assert config["token_endpoint"] == f"{ISSUER}/oauth2/token"
        assert config["issuer"] == ISSUER
        assert set(config["capabilities"]) == {"permission-v1", "permission-v2"}
        assert "system/DiagnosticReport.read" in config["scopes_supported"]
        assert "system/Communication.write" in config["scopes_supported"]
