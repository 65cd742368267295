"""Issue 10, security items 2, 3 and 5, as a hostile client and an operator see them:
Subscription endpoints (allow-list, https, resolved addresses at create and at delivery),
Subscriptions private to the client that made them, channel secrets encrypted at rest,
anonymous access refused on a network address and shown in ``status``, and a data
directory that other users cannot read."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import stat
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from node.dispatch import InProcessDispatcher
from node.fhir.auth import Authenticator
from node.fhir.projection import record_preread
from node.fhir.resources import IdentifierSystems, report_id
from node.fhir.server import ApiServer
from node.fhir.store import FhirStore
from node.fhir.subscriptions import SubscriptionNotifier, deliveries
from node.ledger import StudyLedger
from node.settings import AuthSettings, ConfigError, Settings, load_settings
from node.spool import Spool, write_file_atomically
from tests.peers import free_port, wait_for
from tests.test_fhir_api import Receiver
from tests.test_fhir_resources import add_study

FHIR = {"Content-Type": "application/fhir+json"}
REPO = Path(__file__).resolve().parents[1]
SUBSCRIBER = ["system/Subscription.*", "system/DiagnosticReport.read"]
TOKENS = {"ris": SUBSCRIBER, "other": SUBSCRIBER, "reader": ["system/*.read"]}
INBOX_SECRET = "Bearer inbox-secret-4711"


def bearer(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {name}-secret"}


def token_config() -> list[dict[str, Any]]:
    return [
        {"name": n, "sha256": hashlib.sha256(f"{n}-secret".encode()).hexdigest(), "scopes": s}
        for n, s in TOKENS.items()
    ]


@contextmanager
def api_server(tmp: Path, **fhir: Any) -> Iterator[tuple[ApiServer, Settings]]:
    settings = load_settings(
        None,
        storage={"data_dir": str(tmp / "var"), "min_free_mb": 0},
        api={"host": "127.0.0.1", "port": 0},
        engine={"name": "demo"},
        auth={"tokens": token_config()},
        fhir={"subscription_poll_seconds": 0.05, "subscription_backoff_base_seconds": 0.05,
              "subscription_max_attempts": 2, **fhir},
    )  # fmt: skip
    dispatcher = InProcessDispatcher(lambda *_: None, lambda *_: None)
    server = ApiServer(settings, dispatcher=dispatcher)
    server.start()
    try:
        yield server, settings
    finally:
        server.stop()
        dispatcher.close()


def client(server: ApiServer, who: str) -> httpx.Client:
    return httpx.Client(base_url=server.base_url, headers=bearer(who), timeout=30)


def subscription(endpoint: str, header: str = f"Authorization: {INBOX_SECRET}") -> dict[str, Any]:
    return {"resourceType": "Subscription", "status": "requested", "reason": "RIS inbox",
            "criteria": "DiagnosticReport?status=preliminary",
            "channel": {"type": "rest-hook", "endpoint": endpoint,
                        "payload": "application/fhir+json", "header": [header]}}  # fmt: skip


def refused(response: httpx.Response, words: str) -> None:
    assert response.status_code == 422, response.text
    outcome = response.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert words in outcome["issue"][0]["diagnostics"], outcome


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


@pytest.fixture(scope="module")
def node(
    tmp_path_factory: pytest.TempPathFactory, receiver: Receiver
) -> Iterator[tuple[ApiServer, Settings]]:
    allowed = [receiver.url, "https://localhost:8443/hooks/", "https://169.254.169.254/"]
    with api_server(tmp_path_factory.mktemp("sec"), subscription_allowed_endpoints=allowed) as n:
        yield n


# ----------------------------------------------------------------------------- item 2


def test_no_endpoint_is_allowed_until_the_operator_lists_it(tmp_path: Path) -> None:
    with api_server(tmp_path) as (server, _), client(server, "ris") as ris:
        for endpoint in ("http://169.254.169.254/latest/meta-data/", "https://ris.example/in"):
            r = ris.post("/Subscription", json=subscription(endpoint), headers=FHIR)
            refused(r, "fhir.subscription_allowed_endpoints is empty")
        assert ris.get("/Subscription").json().get("total") == 0


def test_endpoints_must_be_allowed_https_and_resolve_to_allowed_addresses(
    node: tuple[ApiServer, Settings], receiver: Receiver
) -> None:
    server, _ = node
    with client(server, "ris") as ris:
        cases = {
            # not listed (scheme, host, port or path differ from every entry)
            "http://localhost:8443/hooks/x": "is not in fhir.subscription_allowed_endpoints",
            "https://localhost:8443/hooksx": "is not in fhir.subscription_allowed_endpoints",
            "https://evil.example/hooks/": "is not in fhir.subscription_allowed_endpoints",
            receiver.url.replace("127.0.0.1", "127.0.0.2"): "is not in",
            "https://localhost:8443/hooks/../admin": "path segments",
            "https://user:pw@localhost:8443/hooks/": "user or password",
            # listed by host name, but that name resolves to a loopback address
            "https://localhost:8443/hooks/inbox": "resolves to 127.0.0.1, a loopback address",
        }
        for endpoint, words in cases.items():
            refused(ris.post("/Subscription", json=subscription(endpoint), headers=FHIR), words)
        # an address the allow-list names itself is allowed (the operator said so)
        ok = ris.post("/Subscription", json=subscription("https://169.254.169.254/x"),
                      headers=FHIR)  # fmt: skip
        assert ok.status_code == 201, ok.text
        assert ris.delete(f"/Subscription/{ok.json()['id']}").status_code == 204
        # the loopback test endpoint, listed with http and its IP address
        ok = ris.post("/Subscription", json=subscription(receiver.url), headers=FHIR)
        assert ok.status_code == 201, ok.text
        assert ris.delete(f"/Subscription/{ok.json()['id']}").status_code == 204


@pytest.mark.parametrize(
    ("entry", "words"),
    [
        ("http://ris.example/hooks/", "plain http is allowed only to a loopback IP"),
        ("ftp://ris.example/", "must be an https://host"),
        ("https://user@ris.example/", "has a user"),
    ],
)
def test_the_allow_list_itself_is_checked(entry: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        load_settings(None, fhir={"subscription_allowed_endpoints": [entry]})
    with pytest.raises(ConfigError, match="not a network"):
        load_settings(None, fhir={"subscription_allowed_networks": ["10.0.0.0/33"]})


def test_delivery_checks_the_address_the_host_resolves_to_now(tmp_path: Path) -> None:
    """DNS changes after the Subscription was made: the notifier resolves again and refuses
    a link-local (cloud metadata) or private answer; with the network allowed it sends to
    the address it checked."""
    url = f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
    ledger = StudyLedger(url)
    store = FhirStore(url)
    receiver = Receiver()
    port = receiver.httpd.server_address[1]
    endpoint = f"https://ris.hospital.example:{port}/ris/hook"
    store.put({"resourceType": "Subscription", "id": "inbox", "status": "active",
               "reason": "RIS inbox", "criteria": "DiagnosticReport?status=preliminary",
               "channel": {"type": "rest-hook", "endpoint": endpoint}})  # fmt: skip
    uid = add_study(ledger, accession="ACC-DNS")
    record_preread(ledger, uid, 1, systems=IdentifierSystems())
    answers = {"ris.hospital.example": ["169.254.169.254"]}
    settings = load_settings(
        None, fhir={"subscription_allowed_endpoints": [f"https://ris.hospital.example:{port}/"],
                    "subscription_backoff_base_seconds": 0.01}).fhir  # fmt: skip
    notifier = SubscriptionNotifier(store, settings, resolve=lambda host, _: answers[host])
    try:
        assert notifier.deliver_due() == 0
        [d] = deliveries(store.db)
        assert "resolves to 169.254.169.254, a link-local address" in d.last_error
        answers["ris.hospital.example"] = ["10.20.30.40"]
        wait_for(lambda: notifier.deliver_due() == 0 and deliveries(store.db)[0].attempts >= 2,
                 5, what="a second attempt")  # fmt: skip
        assert "a private address" in deliveries(store.db)[0].last_error
        assert receiver.calls == []
    finally:
        receiver.close()
        store.close()
        ledger.close()


# ----------------------------------------------------------------------------- ownership


def test_a_subscription_is_visible_only_to_the_client_that_made_it(
    node: tuple[ApiServer, Settings], receiver: Receiver
) -> None:
    server, _ = node
    with client(server, "ris") as ris, client(server, "other") as other, \
            client(server, "reader") as reader:  # fmt: skip
        created = ris.post("/Subscription", json=subscription(receiver.url), headers=FHIR)
        assert created.status_code == 201, created.text
        sid = created.json()["id"]
        assert "tag" not in created.json().get("meta", {})  # the owner is not served
        assert ris.get(f"/Subscription/{sid}").status_code == 200
        assert sid in [e["resource"]["id"] for e in ris.get("/Subscription").json()["entry"]]
        for stranger in (other, reader):
            r = stranger.get(f"/Subscription/{sid}")
            assert r.status_code == 404, r.text  # 404, not 403: existence does not leak
            assert r.json()["issue"][0]["code"] == "not-found"
            found = stranger.get("/Subscription", params={"status": "active"}).json()
            assert sid not in [e["resource"]["id"] for e in found.get("entry", [])]
        assert other.delete(f"/Subscription/{sid}").status_code == 404
        assert ris.get(f"/Subscription/{sid}").status_code == 200  # still there
        assert ris.delete(f"/Subscription/{sid}").status_code == 204


# ----------------------------------------------------------------------------- item 5: secrets


def test_channel_headers_are_encrypted_at_rest_masked_when_read_and_sent_in_clear(
    node: tuple[ApiServer, Settings], receiver: Receiver
) -> None:
    server, settings = node
    with client(server, "ris") as ris:
        created = ris.post("/Subscription", json=subscription(receiver.url), headers=FHIR)
        assert created.status_code == 201, created.text
        sid = created.json()["id"]
        assert created.json()["channel"]["header"] == ["Authorization: ***"]
        assert ris.get(f"/Subscription/{sid}").json()["channel"]["header"] == ["Authorization: ***"]
        found = ris.get("/Subscription", params={"_id": sid}).json()["entry"][0]["resource"]
        assert found["channel"]["header"] == ["Authorization: ***"]
        # nothing in the database holds the secret; the key lives outside it, 0600
        db = sqlite3.connect(settings.storage.data_path / "ledger.sqlite3")
        bodies = [b for (b,) in db.execute("SELECT body FROM fhir_resources")]
        db.close()
        assert not any("inbox-secret-4711" in b for b in bodies)
        assert any(sid in b and "enc:fernet:" in b for b in bodies)
        key = settings.storage.data_path / "secrets" / "subscription.key"
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
        assert stat.S_IMODE(key.parent.stat().st_mode) == 0o700
        # a new report: the RIS gets the notification with its own header value
        before = len(receiver.calls)
        ledger = StudyLedger(settings.storage.resolved_database_url())
        uid = add_study(ledger, accession="ACC-SECRET")
        record_preread(ledger, uid, 1, systems=IdentifierSystems())
        ledger.close()
        wait_for(lambda: len(receiver.calls) > before, 15, what="the notification")
        method, path, _, headers = receiver.calls[before]
        assert (method, path) == ("PUT", f"/ris/hook/DiagnosticReport/{report_id(uid)}")
        assert headers["Authorization"] == INBOX_SECRET
        assert ris.delete(f"/Subscription/{sid}").status_code == 204


def test_a_header_sealed_with_another_key_is_not_sent(tmp_path: Path) -> None:
    from node.fhir.channel import HeaderCipher

    sealed = HeaderCipher(tmp_path / "a.key").seal([f"Authorization: {INBOX_SECRET}"])
    with pytest.raises(Exception, match="another key"):
        HeaderCipher(tmp_path / "b.key").open(sealed)
    assert HeaderCipher(tmp_path / "a.key").open(sealed) == {"Authorization": INBOX_SECRET}


# ----------------------------------------------------------------------------- item 5: modes


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_data_directory_is_private_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)  # the worst umask: everything would be world-writable
    try:
        data = tmp_path / "var"
        spool = Spool(data / "spool")
        incoming = tmp_path / "incoming.dcm"
        incoming.write_bytes(b"DICM")
        os.chmod(incoming, 0o666)
        stored = spool.store_file(incoming, "1.2.3/1.2.3.4/1.2.3.4.5.dcm", "x", 4)
        result = data / "results" / "1.2.3" / "sr.dcm"
        write_file_atomically(result, lambda f: f.write(b"SR"))
        ledger = StudyLedger(f"sqlite:///{data / 'ledger.sqlite3'}")
        add_study(ledger, accession="ACC-MODE")
        wal = [data / "ledger.sqlite3-wal", data / "ledger.sqlite3-shm"]
        assert all(p.exists() for p in wal)
        for p in (stored.path, result, data / "ledger.sqlite3", *wal):
            assert mode(p) == 0o600, p
        for d in (data, data / "spool", stored.path.parent, stored.path.parent.parent,
                  result.parent, result.parent.parent):  # fmt: skip
            assert mode(d) == 0o700, d
        ledger.close()
    finally:
        os.umask(old)


def node_cli(tmp: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MEDGEMMA_NODE_")}
    environ.update(
        MEDGEMMA_NODE_STORAGE__DATA_DIR=str(tmp / "var"),
        MEDGEMMA_NODE_DICOM__PORT=str(free_port()),
        MEDGEMMA_NODE_API__PORT=str(free_port()),
        MEDGEMMA_NODE_ENGINE__NAME="demo",
        **env,
    )
    return subprocess.run(
        [sys.executable, "-m", "node.cli", *args],
        capture_output=True, text=True, timeout=120, env=environ, cwd=REPO,
        preexec_fn=lambda: os.umask(0o022),  # a usual umask: files 0644, directories 0755
    )  # fmt: skip


def test_start_warns_once_about_a_readable_data_dir_and_refuses_anonymous_network_api(
    tmp_path: Path,
) -> None:
    data = tmp_path / "var"
    data.mkdir(mode=0o755)
    os.chmod(data, 0o755)  # as an older version left it
    ledger = data / "ledger.sqlite3"
    sqlite3.connect(ledger).close()
    os.chmod(ledger, 0o644)
    run = node_cli(tmp_path, "serve", MEDGEMMA_NODE_AUTH__REQUIRED="false",
                   MEDGEMMA_NODE_API__HOST="0.0.0.0")  # fmt: skip
    assert run.returncode == 2, run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("medgemma-node:")]
    assert len(errors) == 1 and "auth.allow_anonymous_on_network" in errors[0], run.stderr
    assert "api.host 0.0.0.0 is not loopback" in errors[0]
    warnings = [line for line in run.stderr.splitlines() if "readable by other users" in line]
    assert any(f"{data} " in w and "0755" in w for w in warnings), run.stderr
    assert any(f"{ledger} " in w and "0644" in w for w in warnings), run.stderr
    assert len(warnings) == len(set(warnings)) == 2  # once per path
    # the log written meanwhile is private although the umask was 022
    assert mode(data / "logs") == 0o700 and mode(data / "logs" / "node.log") == 0o600


def test_status_shows_anonymous_access_and_readable_paths(tmp_path: Path) -> None:
    data = tmp_path / "var"
    data.mkdir()
    os.chmod(data, 0o750)
    text = node_cli(tmp_path, "status", MEDGEMMA_NODE_AUTH__REQUIRED="false")
    assert "WARNING:  auth.required is false: ANONYMOUS callers" in text.stdout, text.stdout
    assert f"WARNING:  {data} is readable by other users (mode 0750" in text.stdout
    as_json = node_cli(tmp_path, "status", "--json", MEDGEMMA_NODE_AUTH__REQUIRED="false")
    warnings = json.loads(as_json.stdout)["warnings"]
    assert any("ANONYMOUS" in w for w in warnings) and any(str(data) in w for w in warnings)
    quiet = json.loads(node_cli(tmp_path, "status", "--json").stdout)["warnings"]
    assert not any("ANONYMOUS" in w for w in quiet)


def test_anonymous_access_is_logged_loudly(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="medgemma.fhir.auth"):
        Authenticator(AuthSettings(required=False))
    assert any("ANONYMOUS callers get every scope" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level("WARNING", logger="medgemma.fhir.auth"):
        Authenticator(AuthSettings(required=True, tokens=[]))
    assert not any("ANONYMOUS" in r.getMessage() for r in caplog.records)


def test_anonymous_access_on_loopback_or_explicitly_allowed_is_accepted() -> None:
    from node.fhir.auth import check_anonymous_bind

    check_anonymous_bind(load_settings(None, auth={"required": False}))  # 127.0.0.1
    check_anonymous_bind(load_settings(None, auth={"required": False}, api={"host": "::1"}))
    check_anonymous_bind(load_settings(
        None, auth={"required": False, "allow_anonymous_on_network": True},
        api={"host": "0.0.0.0"}))  # fmt: skip
    with pytest.raises(ConfigError, match="allow_anonymous_on_network"):
        check_anonymous_bind(load_settings(None, auth={"required": False},
                                           api={"host": "10.1.2.3"}))  # fmt: skip
