"""Debian's Orthanc on free loopback ports: the PACS peer of the tests and of the benchmarks.

One definition of how an Orthanc is configured, started, found ready and stopped, shared by
``tests/peers.py`` (whose ``OrthancPeer`` adds the REST helpers the tests use, and whose
``start_orthanc`` turns a start failure into a test failure) and ``bench/overhead.py``.
Nothing here imports pytest or ``tests`` (a bench never imports ``tests``).
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from bench.nodeproc import free_port

ORTHANC_BINARY = Path("/usr/sbin/Orthanc")
# Debian's orthanc-dicomweb: a symlink to /usr/lib/orthanc/libOrthancDicomWeb.so.<version>.
ORTHANC_DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")

ModalitySpec = tuple[str, str, int]
"""(AE title, host, port) of a DICOM peer that Orthanc knows as a modality."""


class OrthancStartError(Exception):
    """Orthanc did not start (the message holds the end of its log)."""


class OrthancProcess:
    """A running Orthanc: ``aet``/``host``/``dicom_port`` are its DICOM side, ``http_url``
    its REST root (no trailing slash). Stop it with :meth:`stop`."""

    def __init__(
        self,
        process: subprocess.Popen[bytes],
        aet: str,
        dicom_port: int,
        http_port: int,
        workdir: Path,
        log_path: Path,
    ) -> None:
        self.process = process
        self.aet = aet
        self.host = "127.0.0.1"
        self.dicom_port = dicom_port
        self.http_port = http_port
        self.http_url = f"http://127.0.0.1:{http_port}"
        self.workdir = workdir
        self.log_path = log_path

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(aet={self.aet!r}, dicom_port={self.dicom_port}, "
            f"http={self.http_url})"
        )

    def answers(self) -> bool:
        """Its REST API answers ``GET /system`` (Orthanc opens its DICOM port before its
        HTTP server, so this means both are up)."""
        try:
            with urllib.request.urlopen(self.http_url + "/system", timeout=2) as response:
                return bool(response.status == 200)
        except OSError:  # refused, reset, HTTP error, timeout
            return False

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError as exc:
            return f"(no Orthanc log at {self.log_path}: {exc})"
        return "\n".join(text.splitlines()[-lines:])

    def is_running(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        """Stop Orthanc at once.

        SIGKILL, not SIGTERM: its storage is a throwaway directory, and a graceful stop costs
        about 1.5 s per instance (the DICOM server polls for shutdown once a second).
        """
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)


Peer = TypeVar("Peer", bound=OrthancProcess)


def launch_orthanc(
    workdir: Path,
    peer_class: type[Peer],
    *,
    aet: str = "ORTHANC",
    modalities: Mapping[str, ModalitySpec] | None = None,
    extra_config: Mapping[str, Any] | None = None,
    dicomweb: bool = True,
    verbose: bool = True,
    timeout: float = 30.0,
) -> Peer:
    """Start Orthanc with its state under ``workdir``; return ``peer_class(...)`` once its
    REST API and DICOM port answer. Raises OrthancStartError.

    ``modalities`` maps a modality name to (AE title, host, port). ``dicomweb`` loads and
    enables the DICOMweb plugin; ``verbose`` logs at Orthanc's verbose level (the tests
    print the log on failure; a benchmark leaves it off). ``extra_config`` is merged last.
    A port taken between :func:`free_port` and Orthanc's bind gets a few fresh tries.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    last_problem = ""
    for attempt in range(3):
        dicom_port, http_port = free_port(), free_port()
        storage = workdir / f"storage-{attempt}"
        config: dict[str, Any] = {
            "Name": f"medgemma-{aet}",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "DicomAet": aet,
            "DicomPort": dicom_port,
            "HttpPort": http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "HttpDescribeErrors": True,
            "DicomCheckCalledAet": False,
            "DicomModalities": {
                name: [m_aet, host, int(port)]
                for name, (m_aet, host, port) in (modalities or {}).items()
            },
            "DicomModalitiesInDatabase": False,
            # Close the SCU association right after a store, so a peer sees a prompt release.
            "DicomAssociationCloseDelay": 0,
            "UnknownSopClassAccepted": True,
            "StableAge": 2,
            "SaveJobs": False,
            "Plugins": [],
        }
        if dicomweb:
            config["Plugins"] = [str(ORTHANC_DICOMWEB_PLUGIN)]
            config["DicomWeb"] = {
                "Enable": True,
                "Root": "/dicom-web/",
                "EnableWado": True,
                "WadoRoot": "/wado",
                "Host": "127.0.0.1",
                "Ssl": False,
            }
        config.update(extra_config or {})
        config_path = workdir / f"orthanc-{attempt}.json"
        config_path.write_text(json.dumps(config, indent=2))
        log_path = workdir / f"orthanc-{attempt}.log"
        argv = [str(ORTHANC_BINARY), f"--logfile={log_path}"]
        process = subprocess.Popen(
            [*argv, *(["--verbose"] if verbose else []), str(config_path)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=workdir,
        )
        peer = peer_class(process, aet, dicom_port, http_port, workdir, log_path)
        deadline = time.monotonic() + timeout
        while peer.is_running() and time.monotonic() < deadline:
            if peer.answers():
                return peer
            time.sleep(0.02)
        if peer.is_running():
            peer.stop()
            raise OrthancStartError(
                f"Orthanc did not answer on {peer.http_url} within {timeout:g}s; "
                f"log {log_path}:\n{peer.log_tail()}"
            )
        peer.stop()
        last_problem = f"Orthanc exited with status {process.returncode}; log {log_path}:\n"
        last_problem += peer.log_tail()
    raise OrthancStartError(f"Orthanc did not start after 3 tries. {last_problem}")
