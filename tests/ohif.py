"""The OHIF v3 viewer harness: the built viewer in headless Chromium against a test's Orthanc.

What it puts together (each piece as OHIF 3.12 with Orthanc DICOMweb 1.7 needs it):

- ``tests/ohif/vendor/ohif-app-<version>/dist``: the built viewer from the npm package
  @ohif/app, and ``tests/ohif/node_modules/playwright-core``; ``tests/ohif/install.sh``
  installs both (``bash .ci/run`` runs it).
- :class:`ViewerServer`: a stdlib HTTP server on a free loopback port that serves
  ``dist/`` (client routes such as ``/viewer`` fall back to ``index.html``), our
  ``tests/ohif/app-config.js`` (one DICOMweb data source on the same origin, multipart
  only, no OIDC), and proxies ``/dicom-web/*`` to Orthanc, rewriting the BulkDataURI and
  RetrieveURL hosts Orthanc DICOMweb 1.7 builds from its ``Host`` option (port 80) to
  the server's own origin. Every answer carries COOP/COEP, so the decoders get
  SharedArrayBuffer.
- :func:`open_study`: runs ``tests/ohif/driver.mjs`` with Node.js, which drives Debian's
  ``/usr/bin/chromium`` through playwright-core (never a downloaded browser) and prints
  what the viewer shows as JSON (:class:`ViewerReport`).

A missing piece (Node.js, Chromium, the npm packages) fails the test with the command
that installs it; it is never a skip.
"""

from __future__ import annotations

import http.client
import json
import mimetypes
import os
import posixpath
import re
import shutil
import subprocess
import threading
import urllib.parse
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, NoReturn

import pytest

from tests.peers import OrthancPeer

__all__ = [
    "CHROMIUM",
    "OHIF_DIR",
    "ViewerReport",
    "ViewerServer",
    "ohif_viewer",
    "open_study",
    "viewer_dist",
]

OHIF_DIR = Path(__file__).resolve().parent / "ohif"
CHROMIUM = Path("/usr/bin/chromium")
DRIVER = OHIF_DIR / "driver.mjs"
APP_CONFIG = OHIF_DIR / "app-config.js"
MIN_NODE_MAJOR = 20

_INSTALL_HINT = "run `bash .ci/run` (as root; it installs it)"

# Orthanc DICOMweb writes absolute URLs from its "Host" option; any host in them is replaced.
_ABSOLUTE_DICOMWEB_URL = re.compile(rb"https?://[^/\"\s]+/dicom-web/")
# Hop-by-hop headers and the ones this proxy sets itself are not copied from Orthanc.
_NOT_FORWARDED = {
    "connection",
    "keep-alive",
    "transfer-encoding",
    "content-length",
    "content-encoding",
    "server",
    "date",
}
_CROSS_ORIGIN_ISOLATION = {
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Embedder-Policy": "require-corp",
    "Cross-Origin-Resource-Policy": "same-origin",
}
mimetypes.add_type("application/wasm", ".wasm")
mimetypes.add_type("text/javascript", ".js")
mimetypes.add_type("text/javascript", ".mjs")


def _fail(message: str) -> NoReturn:
    pytest.fail(message, pytrace=False)


def viewer_dist() -> Path:
    """The built OHIF viewer (``dist/``) pinned in tests/ohif/package.json; fails if absent."""
    pins = json.loads((OHIF_DIR / "package.json").read_text())["ohifViewer"]
    dist = OHIF_DIR / "vendor" / f"ohif-app-{pins['version']}" / "dist"
    if not (dist / "index.html").is_file():
        _fail(
            f"the OHIF viewer {pins['package']} {pins['version']} is not installed ({dist} is "
            f"missing): {_INSTALL_HINT}, or `bash tests/ohif/install.sh`"
        )
    return dist


def _check_browser_tools() -> str:
    """Path of ``node``; fails naming the fix when Node.js, Chromium or playwright-core is
    missing."""
    node = shutil.which("node")
    if node is None:
        _fail(
            f"Node.js is not installed (no `node` on PATH): {_INSTALL_HINT}, or "
            "`apt-get install nodejs npm`"
        )
    version = subprocess.run(
        [node, "--version"], capture_output=True, text=True, timeout=30, check=False
    ).stdout.strip()
    if int(version.lstrip("v").split(".")[0] or 0) < MIN_NODE_MAJOR:
        _fail(
            f"Node.js {version} is too old: playwright-core 1.65 needs Node.js "
            f"{MIN_NODE_MAJOR} or newer (the machine's NodeSource build, not Debian's 18)"
        )
    if not os.access(CHROMIUM, os.X_OK):
        _fail(
            f"Chromium is not installed ({CHROMIUM} is missing): {_INSTALL_HINT}, or "
            "`apt-get install chromium`"
        )
    if not (OHIF_DIR / "node_modules" / "playwright-core" / "package.json").is_file():
        _fail(
            f"playwright-core is not installed in {OHIF_DIR / 'node_modules'}: "
            f"{_INSTALL_HINT}, or `bash tests/ohif/install.sh`"
        )
    return node


# --------------------------------------------------------------------------- server


class ViewerServer(ThreadingHTTPServer):
    """Serves the OHIF viewer and proxies ``/dicom-web/*`` to one Orthanc (same origin).

    ``url`` is its origin (``http://127.0.0.1:<port>``). Its answers are not logged: the
    browser reports a failed request as a console error, which fails the driver's report.
    """

    daemon_threads = True

    def __init__(self, dist: Path, app_config: Path, orthanc: OrthancPeer) -> None:
        super().__init__(("127.0.0.1", 0), _ViewerRequestHandler)
        self.dist = dist.resolve()
        self.app_config = app_config
        self.orthanc_host = orthanc.host
        self.orthanc_port = orthanc.http_port
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self.serve_forever, name="ohif-viewer", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)


class _ViewerRequestHandler(BaseHTTPRequestHandler):
    server: ViewerServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        """Not logged (see ViewerServer)."""

    def end_headers(self) -> None:
        for name, value in _CROSS_ORIGIN_ISOLATION.items():
            self.send_header(name, value)
        super().end_headers()

    def do_GET(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        path = urllib.parse.urlsplit(self.path).path
        if path.startswith("/dicom-web/"):
            self._proxy()
        elif path == "/app-config.js":
            self._send_file(self.server.app_config)
        else:
            self._static(path)

    def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_file(self, path: Path) -> None:
        content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        self._send(
            200, path.read_bytes(), {"Content-Type": content_type, "Cache-Control": "no-cache"}
        )

    def _static(self, path: str) -> None:
        relative = posixpath.normpath(urllib.parse.unquote(path)).lstrip("/")
        candidate = (self.server.dist / relative).resolve()
        inside = candidate == self.server.dist or self.server.dist in candidate.parents
        if inside and candidate.is_file():
            self._send_file(candidate)
        elif inside and "." not in posixpath.basename(relative):
            self._send_file(self.server.dist / "index.html")  # a client route: /viewer, ...
        else:
            self._send(404, b"not found\n", {"Content-Type": "text/plain"})

    def _proxy(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        headers = {
            name: value
            for name, value in self.headers.items()
            if name.lower() in ("accept", "content-type")
        }
        connection = http.client.HTTPConnection(
            self.server.orthanc_host, self.server.orthanc_port, timeout=60
        )
        try:
            connection.request(self.command, self.path, body=body, headers=headers)
            response = connection.getresponse()
            payload = response.read()
        except OSError as exc:
            self._send(
                502, f"Orthanc did not answer: {exc}\n".encode(), {"Content-Type": "text/plain"}
            )
            return
        finally:
            connection.close()
        forwarded = {
            name: value
            for name, value in response.getheaders()
            if name.lower() not in _NOT_FORWARDED
        }
        if "json" in forwarded.get("Content-Type", ""):
            origin = f"{self.server.url}/dicom-web/".encode()
            payload = _ABSOLUTE_DICOMWEB_URL.sub(origin, payload)
        self._send(response.status, payload, forwarded)


@pytest.fixture
def ohif_viewer(orthanc: OrthancPeer) -> Iterator[str]:
    """Origin (``http://127.0.0.1:<port>``) of the OHIF viewer reading the ``orthanc`` peer."""
    server = ViewerServer(viewer_dist(), APP_CONFIG, orthanc)
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


# --------------------------------------------------------------------------- driver


@dataclass(frozen=True)
class ViewerReport:
    """What the viewer showed, as ``tests/ohif/driver.mjs`` read it (see its header).

    ``ok`` is False when the page failed (console errors, a step that timed out);
    ``errors`` says why. ``sr`` / ``seg`` are the driver's findings for each (None when
    not asked for); ``screenshots`` the PNG files it wrote; ``timings`` seconds since
    the driver started, at the end of each step. ``probe_image`` holds, for each probe
    point, its canvas position (CSS pixels) and the RGBA drawn there on the plain image;
    ``sr["probe"]`` and ``seg["probeOverlay"]`` / ``seg["probeOpened"]`` the same with
    the SR, the SEG overlay, and the SEG opened on the image.
    """

    ok: bool
    errors: list[str]
    console: list[str]
    tour_skipped: bool
    display_sets: list[dict[str, Any]]
    sr: dict[str, Any] | None
    seg: dict[str, Any] | None
    screenshots: list[str]
    timings: dict[str, float]
    probe_image: list[dict[str, Any]]

    def explain(self) -> str:
        """A readable dump for an assertion message."""
        return json.dumps(self.__dict__, indent=1)[:20000]


def open_study(
    url: str,
    study_uid: str,
    screenshot_dir: Path,
    *,
    sr_series_uid: str | None = None,
    seg_series_uid: str | None = None,
    probe_points: Sequence[tuple[float, float]] = (),
    timeout: float = 90.0,
) -> ViewerReport:
    """Open ``study_uid`` in the viewer at ``url`` in headless Chromium and report.

    With ``sr_series_uid`` the SR's thumbnail is double-clicked and its measurements read
    (OHIF's parsed display set, the drawn SVG overlay, the measurements panel); with
    ``seg_series_uid`` the SEG is opened the same way and its segments read from OHIF's
    segmentation service. ``probe_points`` are image positions ``(column, row)`` in
    continuous pixel coordinates (the SCOORD convention) whose drawn colour is read at
    each step. Screenshots go to ``screenshot_dir``.
    """
    node = _check_browser_tools()
    screenshot_dir.mkdir(parents=True, exist_ok=True)
    request = {
        "url": url,
        "studyUid": study_uid,
        "srSeriesUid": sr_series_uid,
        "segSeriesUid": seg_series_uid,
        "screenshotDir": str(screenshot_dir),
        "chromium": str(CHROMIUM),
        "timeoutMs": int(timeout * 1000),
        "probePoints": [[float(col), float(row)] for col, row in probe_points],
    }
    try:
        result = subprocess.run(
            [node, str(DRIVER), json.dumps(request)],
            cwd=OHIF_DIR,
            capture_output=True,
            text=True,
            timeout=timeout + 30,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(
            f"the viewer driver did not finish within {timeout + 30:g}s: {exc.stderr!r}"
        ) from None
    lines = result.stdout.strip().splitlines()
    try:
        data = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        raise AssertionError(
            f"the viewer driver exited with {result.returncode} without a report:\n"
            f"stdout: {result.stdout[-4000:]}\nstderr: {result.stderr[-4000:]}"
        ) from None
    return ViewerReport(
        ok=bool(data.get("ok")),
        errors=list(data.get("errors", [])),
        console=list(data.get("console", [])),
        tour_skipped=bool(data.get("tourSkipped")),
        display_sets=list(data.get("displaySets", [])),
        sr=data.get("sr"),
        seg=data.get("seg"),
        screenshots=list(data.get("screenshots", [])),
        timings={k: float(v) for k, v in data.get("timings", {}).items()},
        probe_image=list(data.get("probeImage", [])),
    )
