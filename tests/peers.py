"""Real peers for the tests: dcmtk, dicom3tools, Orthanc (with DICOMweb), Redis, PostgreSQL.

``tests/conftest.py`` star-imports this module, which brings in the fixtures
(``redis_url``, ``postgres_url``, ``orthanc``, ``orthanc_factory``), the helpers
and the report hook the Orthanc fixture uses to print its log on failure.

A missing peer is a test failure that says how to install or start it, never a
skip: ``bash .ci/run`` installs and starts everything. dcmtk's tools are taken
from /usr/bin only, because pynetdicom installs its own ``storescu``, ``echoscu``
and ``storescp`` into the virtual environment, which would shadow them on PATH.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

import psycopg
import pytest
import redis
from psycopg import sql
from sqlalchemy.engine import make_url

from bench.nodeproc import free_port, wait_for
from bench.orthanc import (
    ORTHANC_BINARY,
    ORTHANC_DICOMWEB_PLUGIN,
    ModalitySpec,
    OrthancProcess,
    OrthancStartError,
    launch_orthanc,
)

__all__ = [
    "DEFAULT_POSTGRES_ADMIN_URL",
    "DEFAULT_REDIS_URL",
    "ORTHANC_BINARY",
    "ORTHANC_DICOMWEB_PLUGIN",
    "OrthancError",
    "OrthancPeer",
    "dciodvfy_errors",
    "dcmtk",
    "dsrdump_ok",
    "free_port",
    "orthanc",
    "orthanc_factory",
    "postgres_url",
    "pytest_runtest_makereport",
    "redis_url",
    "start_orthanc",
    "wait_for",
]


DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/15"
DEFAULT_POSTGRES_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"

DCMTK_DIR = Path("/usr/bin")
DICIODVFY = Path("/usr/bin/dciodvfy")

_INSTALL_HINT = "run `bash .ci/run` (as root) or `apt-get install {package}`"


def _fail(message: str) -> NoReturn:
    pytest.fail(message, pytrace=False)


# --------------------------------------------------------------------------- helpers


def dcmtk(name: str) -> str:
    """Absolute path of dcmtk's tool ``name`` (storescu, echoscu, storescp, dsrdump, dcmdump...).

    Only /usr/bin is looked at: the venv's pynetdicom scripts of the same names are not dcmtk.
    """
    path = DCMTK_DIR / name
    if not (path.is_file() and os.access(path, os.X_OK)):
        _fail(
            f"dcmtk's {name} is not installed ({path} is missing): "
            + _INSTALL_HINT.format(package="dcmtk")
        )
    return str(path)


def dciodvfy_errors(path: str | os.PathLike[str]) -> list[str]:
    """Run dicom3tools' dciodvfy on ``path``; return its ``Error`` lines (warnings are dropped)."""
    if not os.access(DICIODVFY, os.X_OK):
        _fail(
            f"dicom3tools' dciodvfy is not installed ({DICIODVFY} is missing): "
            + _INSTALL_HINT.format(package="dicom3tools")
        )
    # dciodvfy writes its findings to stderr and exits 0 even when it finds errors.
    result = subprocess.run(
        [str(DICIODVFY), os.fspath(path)], capture_output=True, text=True, timeout=60, check=False
    )
    lines = (result.stdout + result.stderr).splitlines()
    return [line for line in lines if line.startswith("Error")]


def dsrdump_ok(path: str | os.PathLike[str]) -> tuple[bool, str]:
    """Parse ``path`` with dcmtk's dsrdump; return (ok, output).

    ok is False when dsrdump exits non-zero or prints an error (``E:``) or fatal (``F:``) line;
    the output (stdout then stderr) holds the rendered report or the messages.
    """
    result = subprocess.run(
        [dcmtk("dsrdump"), os.fspath(path)],
        capture_output=True,
        text=True,
        errors="replace",  # dsrdump may cut a long value inside a UTF-8 character
        timeout=60,
        check=False,
    )
    output = result.stdout + result.stderr
    has_errors = any(line.startswith(("E:", "F:")) for line in output.splitlines())
    return result.returncode == 0 and not has_errors, output


# --------------------------------------------------------------------------- Redis


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """URL of a Redis database the tests own (MEDGEMMA_TEST_REDIS_URL); flushed at start and end."""
    url = os.environ.get("MEDGEMMA_TEST_REDIS_URL", DEFAULT_REDIS_URL)
    client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=5)
    # DB 0 is the node's default broker: never flush it from a test run.
    if int(client.connection_pool.connection_kwargs.get("db", 0)) == 0:
        _fail(f"MEDGEMMA_TEST_REDIS_URL={url} points at DB 0; the tests flush it, use e.g. /15")
    problem = ""
    try:
        client.ping()
    except redis.RedisError as exc:
        problem = str(exc)
    if problem:  # failed outside the except block: one clear message, no exception chain
        _fail(
            f"Redis at {url} does not answer ({problem}): run `bash .ci/run`, or start it with "
            '`redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" '
            "--appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log`"
        )
    client.flushdb()
    try:
        yield url
    finally:
        client.flushdb()
        client.close()


# --------------------------------------------------------------------------- PostgreSQL


def _libpq_url(sqlalchemy_url: str) -> str:
    """The libpq form (postgresql://...) of a SQLAlchemy URL such as postgresql+psycopg://..."""
    return (
        make_url(sqlalchemy_url).set(drivername="postgresql").render_as_string(hide_password=False)
    )


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """SQLAlchemy URL (postgresql+psycopg://...) of a fresh, empty database for one test.

    Created through the admin URL in MEDGEMMA_TEST_POSTGRES_URL, dropped WITH (FORCE) afterwards,
    so connections the test left open do not keep it alive.
    """
    admin_url = os.environ.get("MEDGEMMA_TEST_POSTGRES_URL", DEFAULT_POSTGRES_ADMIN_URL)
    name = f"medgemma_test_{secrets.token_hex(6)}"
    try:
        admin = psycopg.connect(_libpq_url(admin_url), autocommit=True, connect_timeout=5)
    except psycopg.Error as exc:
        problem = " ".join(str(exc).split())
    else:
        problem = ""
    if problem:  # failed outside the except block: one clear message, no exception chain
        _fail(
            f"PostgreSQL at {make_url(admin_url)!s} does not answer ({problem}): "
            "run `bash .ci/run`, "
            "or start it with `pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main "
            "start`, or set MEDGEMMA_TEST_POSTGRES_URL to an admin URL that can CREATE DATABASE"
        )
    with admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(_libpq_url(admin_url), autocommit=True, connect_timeout=5) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


# --------------------------------------------------------------------------- Orthanc


class OrthancError(Exception):
    """An Orthanc REST call answered with an HTTP error."""

    def __init__(self, method: str, path: str, status: int, body: str) -> None:
        super().__init__(f"Orthanc {method} {path} -> HTTP {status}: {body}")
        self.status = status
        self.body = body


class OrthancPeer(OrthancProcess):
    """A running Orthanc (``bench.orthanc.OrthancProcess``): the PACS the node receives from
    and sends results to, with the REST calls the tests use (DICOMweb under
    ``/dicom-web/``). Stop it with ``stop()`` (the fixtures do).
    """

    # -- REST

    def rest(
        self,
        method: str,
        path: str,
        json: Any = None,
        data: bytes | None = None,
        content_type: str | None = None,
        timeout: float = 30.0,
    ) -> Any:
        """Call the REST API; return parsed JSON, or bytes for a non-JSON answer.

        ``json`` is sent as a JSON body, ``data`` as raw bytes (with ``content_type``).
        An HTTP error raises OrthancError with Orthanc's own description of it.
        """
        headers = {"Accept": "application/json, */*"}
        body = data
        if json is not None:
            body = _json_dumps(json)
            headers["Content-Type"] = "application/json"
        elif content_type is not None:
            headers["Content-Type"] = content_type
        url = self.http_url + (path if path.startswith("/") else "/" + path)
        request = urllib.request.Request(url, data=body, method=method.upper(), headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                payload: bytes = response.read()
                is_json = "json" in response.headers.get("Content-Type", "")
        except urllib.error.HTTPError as exc:
            raise OrthancError(
                method.upper(), path, exc.code, exc.read().decode("utf-8", "replace")
            ) from None
        if is_json:
            return _json_loads(payload) if payload else None
        return payload

    def system(self) -> dict[str, Any]:
        result: dict[str, Any] = self.rest("GET", "/system", timeout=2)
        return result

    def instances(self) -> list[str]:
        """Orthanc ids of all instances it holds."""
        return list(self.rest("GET", "/instances"))

    def studies(self) -> list[str]:
        """Orthanc ids of all studies it holds."""
        return list(self.rest("GET", "/studies"))

    def upload(self, path: str | os.PathLike[str]) -> str:
        """Store a DICOM file through REST (POST /instances); return its Orthanc instance id."""
        answer = self.rest(
            "POST", "/instances", data=Path(path).read_bytes(), content_type="application/dicom"
        )
        if answer.get("Status") not in ("Success", "AlreadyStored"):
            raise AssertionError(f"Orthanc did not store {path}: {answer}")
        return str(answer["ID"])

    def instance_file(self, instance_id: str) -> bytes:
        """The stored DICOM file of an instance, byte for byte."""
        payload: bytes = self.rest("GET", f"/instances/{instance_id}/file")
        return payload

    def instance_tags(self, instance_id: str) -> dict[str, Any]:
        """Keyword -> value of an instance's attributes (Orthanc's simplified tags)."""
        tags: dict[str, Any] = self.rest("GET", f"/instances/{instance_id}/simplified-tags")
        return tags

    def find_instance(self, sop_instance_uid: str) -> str | None:
        """Orthanc id of the instance with this SOP Instance UID, or None."""
        matches = self.rest("POST", "/tools/lookup", data=sop_instance_uid.encode("ascii"))
        for match in matches:
            if match.get("Type") == "Instance":
                return str(match["ID"])
        return None

    def wait_for_instance(self, sop_instance_uid: str, timeout: float = 15.0) -> str:
        """Wait until Orthanc holds the instance (e.g. after a C-STORE to it); return its id."""
        instance_id = wait_for(
            lambda: self.find_instance(sop_instance_uid),
            timeout=timeout,
            interval=0.1,
            what=f"Orthanc {self.aet} to hold SOP instance {sop_instance_uid}",
        )
        assert instance_id is not None  # wait_for returns only a truthy value
        return instance_id

    # -- modalities (the DICOM peers Orthanc may send to)

    def add_modality(self, name: str, aet: str, host: str, port: int) -> None:
        """Declare a DICOM peer at runtime (PUT /modalities/{name}); e.g. the node under test."""
        self.rest("PUT", f"/modalities/{name}", json={"AET": aet, "Host": host, "Port": port})

    def modalities(self) -> dict[str, Any]:
        result: dict[str, Any] = self.rest("GET", "/modalities?expand")
        return result

    def echo_modality(self, name: str) -> None:
        """C-ECHO from Orthanc to a declared modality; raises OrthancError if it fails."""
        self.rest("POST", f"/modalities/{name}/echo", json={})

    def store_to_modality(self, name: str, resource_ids: str | Sequence[str]) -> dict[str, Any]:
        """C-STORE resources (instance/series/study ids) to a declared modality, synchronously.

        Returns Orthanc's job summary; raises OrthancError when the store fails.
        """
        ids = [resource_ids] if isinstance(resource_ids, str) else list(resource_ids)
        result: dict[str, Any] = self.rest(
            "POST",
            f"/modalities/{name}/store",
            json={"Resources": ids, "Synchronous": True},
            timeout=120,
        )
        return result


def _json_dumps(value: Any) -> bytes:
    return json.dumps(value).encode("utf-8")


def _json_loads(payload: bytes) -> Any:
    return json.loads(payload)


def start_orthanc(
    workdir: Path,
    aet: str = "ORTHANC",
    modalities: Mapping[str, ModalitySpec] | None = None,
    extra_config: Mapping[str, Any] | None = None,
    timeout: float = 30.0,
) -> OrthancPeer:
    """Start Debian's Orthanc on free loopback ports with its state under ``workdir``.

    ``modalities`` maps a modality name to (AE title, host, port); more can be added later
    with ``OrthancPeer.add_modality``. The DICOMweb plugin is loaded and enabled. Returns once
    both the REST API and the DICOM port answer. The caller stops it (``OrthancPeer.stop``).
    """
    if not os.access(ORTHANC_BINARY, os.X_OK):
        _fail(
            f"Orthanc is not installed ({ORTHANC_BINARY}): "
            + _INSTALL_HINT.format(package="orthanc")
        )
    if not ORTHANC_DICOMWEB_PLUGIN.exists():
        _fail(
            f"Orthanc's DICOMweb plugin is not installed ({ORTHANC_DICOMWEB_PLUGIN}): "
            + _INSTALL_HINT.format(package="orthanc-dicomweb")
        )
    try:
        return launch_orthanc(
            workdir,
            OrthancPeer,
            aet=aet,
            modalities=modalities,
            extra_config=extra_config,
            timeout=timeout,
        )
    except OrthancStartError as exc:
        problem = str(exc)
    _fail(problem)  # outside the except block: one clear message, no exception chain


_ORTHANC_PEERS = pytest.StashKey[list[OrthancPeer]]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Attach the log of each Orthanc a failed test started to its failure report."""
    report = yield
    if report.failed and report.when in ("setup", "call"):
        for peer in item.stash.get(_ORTHANC_PEERS, []):
            report.sections.append(
                (f"Orthanc {peer.aet} log {peer.log_path} (last lines)", peer.log_tail())
            )
    return report


OrthancFactory = Callable[..., OrthancPeer]


@pytest.fixture
def orthanc_factory(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OrthancFactory]:
    """Start any number of Orthancs for one test: ``orthanc_factory(aet="PACS", modalities=...)``.

    Keyword arguments are those of ``start_orthanc`` (less ``workdir``). All are stopped after
    the test; a failed test's report carries each one's log path and last lines.
    """
    started: list[OrthancPeer] = []
    request.node.stash[_ORTHANC_PEERS] = started

    def start(**kwargs: Any) -> OrthancPeer:
        workdir = tmp_path_factory.mktemp(f"orthanc-{kwargs.get('aet', 'ORTHANC').lower()}")
        peer = start_orthanc(workdir, **kwargs)
        started.append(peer)
        print(f"started {peer!r}, log {peer.log_path}")
        return peer

    yield start
    died = [peer for peer in started if not peer.is_running()]
    for peer in started:
        peer.stop()
    if died:
        _fail(
            "\n".join(
                f"{peer!r} died during the test (status {peer.process.returncode}); "
                f"log {peer.log_path}:\n{peer.log_tail()}"
                for peer in died
            )
        )


@pytest.fixture
def orthanc(orthanc_factory: OrthancFactory, request: pytest.FixtureRequest) -> OrthancPeer:
    """One Orthanc (AE title ORTHANC) on free loopback ports, DICOMweb enabled.

    Declare modalities up front with indirect parametrisation::

        @pytest.mark.parametrize("orthanc", [{"NODE": ("MEDGEMMA", "127.0.0.1", 11112)}],
                                 indirect=True)

    or at runtime with ``orthanc.add_modality(name, aet, host, port)``.
    """
    modalities: Mapping[str, ModalitySpec] | None = getattr(request, "param", None)
    return orthanc_factory(modalities=modalities)
