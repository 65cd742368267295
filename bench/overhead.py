"""End-to-end overhead (issue 13 item 2): from the last C-STORE response to the results.

For each of ``--count`` single-image chest CR studies, one dcmtk ``storescu`` association
sends the study to the node; the clock starts when storescu returns (its last C-STORE
response and the release are behind it) and stops, separately,

- **pacs**: when the study's SR and SEG are both in Orthanc (its REST API's
  ``/tools/lookup`` finds both SOP Instance UIDs), and
- **fhir**: when ``GET /fhir/DiagnosticReport/<id>`` through the node's FHIR API answers
  a report in status preliminary, final or amended.

Both are polled every ``--interval`` seconds (default 50 ms: the figures are up to one
interval late, half of it on average, so they err against the node). The polling is load
the node would not see from a RIS: every GET is a FHIR request with its token check and
AuditEvent, in ``serve`` in the process that runs the pre-read. At 10 ms (the default before
2026-12-03) it cost the node about 200 ms of CPU per study and raised p50 and p95 by
0.1-0.2 s against 50 ms in alternating runs (docs/performance.md, "Poll interval").
Studies are sent one after another, each once the
previous one is measured, so each figure is one study's latency on an otherwise idle node.

Modes, each on a fresh data directory and a fresh Orthanc:

- ``serve``: ``medgemma-node serve`` (SCP, FHIR API and the embedded worker in one process).
- ``worker``: ``medgemma-node scp`` + ``medgemma-node worker`` (Celery, one process, Redis
  ``--redis``) + ``medgemma-node api``.
- ``serve-quiet``: ``serve`` with ``completion.on_association_release = false``: the path of
  an association that stays open, completed by the quiet period (``--quiet-seconds``).
- ``serve-nograce``: ``serve`` with ``completion.release_grace_seconds = 0``: what the grace
  time that keeps back-to-back associations of one study at one version costs.
- ``serve-fullgrace``: ``serve`` with ``completion.release_host_idle_seconds`` equal to the
  grace time: every release waits the whole grace time (the node before 2026-12-03 evening),
  instead of completing once the sender's host has no connection open.

The "beyond the quiet period" figure is the latency less the time the node waits on
purpose: nothing when completion on release applies, the quiet period otherwise.

**Peer**, measured in the same run, right after each study: the wall time of a plain
dcmtk ``storescu`` storing the same SR and SEG files (from the node's results directory)
into the same Orthanc over one association. That is the floor of the delivery step; the
ratio says how many such stores the whole path (completion, queue, pre-read with the demo
engine, SR/SEG build, delivery) costs. Orthanc runs with ``OverwriteInstances`` so that
the peer's store of an instance it already holds is a real write.

The ledger's own timestamps (completed, queued, started, finished, delivered) give the
breakdown of where the time went (``--json``; a table on stdout).

``--release-gaps N`` measures what ``completion.release_grace_seconds`` has to cover: N
two-view studies, each view sent by its own storescu right after the other (a sender that
sends a series per association); the gap is from the first storescu's return to the
ledger's ``received_at`` of the second view (its transfer, stored and committed). The node
runs with a grace time of 30 s and no host check before it ends, so nothing completes in
between. It also measures what
``completion.release_host_idle_seconds`` has to cover, the gap before such a sender's next
connection: N times, from the start of a storescu (the next one of a shell loop) to a
listening socket's accept of its connection.

Needs dcmtk (``/usr/bin/storescu``, or ``DCMTK_BIN``), Orthanc (``/usr/sbin/Orthanc``) and,
for ``worker``, Redis. Orthanc is started by ``bench.orthanc`` (the tests' starter too),
without its DICOMweb plugin and verbose log.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import secrets
import socket
import sqlite3
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python bench/overhead.py` from anywhere
    sys.path.insert(0, str(REPO))

from bench.ingest import tree_cpu_seconds  # noqa: E402
from bench.nodeproc import (  # noqa: E402
    ServerProcess,
    dicom_echo,
    free_port,
    http_ok,
    start_node,
    wait_for,
)
from bench.orthanc import ORTHANC_BINARY, OrthancProcess, launch_orthanc  # noqa: E402

DCMTK_BIN = Path(os.environ.get("DCMTK_BIN", "/usr/bin"))
NODE_AE = "MEDGEMMA"
TOKEN = "bench-" + secrets.token_hex(8)
READY_REPORT = {"preliminary", "final", "amended"}
MODES = ("serve", "worker", "serve-quiet", "serve-nograce", "serve-fullgrace")


class BenchError(Exception):
    """The benchmark cannot produce a figure (a peer missing, a study never arriving)."""


# --------------------------------------------------------------------------- peers


class Orthanc(OrthancProcess):
    def has_all(self, sop_uids: Sequence[str]) -> bool:
        for uid in sop_uids:
            request = urllib.request.Request(
                self.http_url + "/tools/lookup", data=uid.encode(), method="POST"
            )
            with urllib.request.urlopen(request, timeout=5) as response:
                if not json.loads(response.read()):
                    return False
        return True


def start_orthanc(work: Path) -> Orthanc:
    if not os.access(ORTHANC_BINARY, os.X_OK):
        raise BenchError(f"Orthanc is not installed ({ORTHANC_BINARY}): apt-get install orthanc")
    # OverwriteInstances: the peer's second store of an instance is a real write
    return launch_orthanc(
        work,
        Orthanc,
        extra_config={"OverwriteInstances": True},
        dicomweb=False,
        verbose=False,
    )


def storescu(port: int, files: Sequence[Path], ae_title: str) -> float:
    """Send ``files`` over one association with dcmtk storescu; returns its wall seconds."""
    started = time.monotonic()
    done = subprocess.run(
        [str(DCMTK_BIN / "storescu"), "-R", "-aet", "BENCH", "-aec", ae_title]
        + ["127.0.0.1", str(port)]
        + [str(f) for f in files],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "TCP_NODELAY": "1"},  # dcmtk's Nagle default waits on delayed ACKs
    )
    took = time.monotonic() - started
    if done.returncode != 0:
        raise BenchError(f"storescu to port {port} failed: {done.stderr.strip()[-500:]}")
    return took


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class StudyFile:
    path: Path
    study_uid: str


def make_studies(directory: Path, count: int, seed: int, rows: int, cols: int) -> list[StudyFile]:
    """``count`` single-image chest CR studies (node.synthetic), one file each, cached."""
    from pydicom import dcmread

    from node.synthetic import make_chest_radiograph, write_study

    out: list[StudyFile] = []
    for i in range(count):
        folder = directory / f"{rows}x{cols}-s{seed + i}"
        existing = sorted(folder.glob("*.dcm"))
        if existing:
            path = existing[0]
            uid = str(dcmread(path, stop_before_pixels=True).StudyInstanceUID)
        else:
            image = make_chest_radiograph(
                seed=seed + i, rows=rows, cols=cols, accession_number=f"BENCH{seed + i}"
            )
            (path,) = write_study(folder, [image])
            uid = str(image.dataset.StudyInstanceUID)
        out.append(StudyFile(path, uid))
    return out


# --------------------------------------------------------------------------- node


@dataclass
class Node:
    """The node's processes of one mode, and where to look."""

    mode: str
    processes: list[ServerProcess]
    dicom_port: int
    api_url: str
    data_dir: Path
    waits_quiet: bool

    def stop(self) -> None:
        for p in reversed(self.processes):
            p.stop()


def write_config(path: Path, values: dict[str, dict[str, Any]], orthanc: Orthanc) -> None:
    def toml_value(v: Any) -> str:
        return json.dumps(v)  # strings, numbers and booleans read the same in TOML

    lines: list[str] = []
    for section, entries in values.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in entries.items()]
        lines.append("")
    lines += [
        "[[auth.tokens]]",
        'name = "bench"',
        f'sha256 = "{hashlib.sha256(TOKEN.encode()).hexdigest()}"',
        'scopes = ["system/*.read"]',
        "",
        "[[destinations]]",
        f'ae_title = "{orthanc.aet}"',
        'host = "127.0.0.1"',
        f"port = {orthanc.dicom_port}",
        "",
    ]
    path.write_text("\n".join(lines))


def start_mode(
    mode: str, work: Path, orthanc: Orthanc, args: argparse.Namespace, extra: dict[str, Any]
) -> Node:
    data_dir = work / "var"
    dicom_port, api_port = free_port(), free_port()
    release = mode != "serve-quiet"
    values: dict[str, dict[str, Any]] = {
        "dicom": {"ae_title": NODE_AE, "bind_address": "127.0.0.1", "port": dicom_port},
        "storage": {"data_dir": str(data_dir), "min_free_mb": 0},
        "completion": {
            "quiet_seconds": args.quiet_seconds,
            "on_association_release": release,
            **({"release_grace_seconds": 0} if mode == "serve-nograce" else {}),
            **extra.get("completion", {}),
        },
        "engine": {"name": "demo"},
        "api": {"host": "127.0.0.1", "port": api_port},
        "retention": {"days": 0, "emergency_free_mb": 0},
        "outbox": dict(extra.get("outbox", {})),
    }
    if mode == "serve-fullgrace":  # the host check no sooner than the grace time ends
        from node.settings import CompletionSettings

        completion = values["completion"]
        completion["release_host_idle_seconds"] = completion.get(
            "release_grace_seconds", CompletionSettings().release_grace_seconds
        )
    if mode == "worker":
        tag = secrets.token_hex(3)
        values["queue"] = {
            "broker_url": args.redis,
            "preread_queue": f"bench-preread-{tag}",
            "followup_queue": f"bench-followup-{tag}",
        }
    values = {k: v for k, v in values.items() if v}
    config = work / "node.toml"
    write_config(config, values, orthanc)
    api_url = f"http://127.0.0.1:{api_port}"
    processes: list[ServerProcess] = []
    node = Node(mode, processes, dicom_port, api_url, data_dir, waits_quiet=not release)
    try:
        if mode == "worker":
            processes.append(
                start_node(["scp"], log=work / "scp.log", config=config,
                           ready=lambda p: dicom_echo(dicom_port, NODE_AE), what="SCP")
            )  # fmt: skip
            processes.append(
                start_node(["worker", "--concurrency", "1", "--hostname", f"bench-{tag}@%h"],
                           log=work / "worker.log", config=config,
                           ready=lambda p: p.log_has(" ready."), what="Celery worker ready")
            )  # fmt: skip
            processes.append(
                start_node(["api"], log=work / "api.log", config=config,
                           ready=lambda p: http_ok(api_url + "/fhir/metadata"), what="FHIR API")
            )  # fmt: skip
        else:
            processes.append(
                start_node(["serve"], log=work / "serve.log", config=config,
                           ready=lambda p: http_ok(api_url + "/fhir/metadata"), what="serve")
            )  # fmt: skip
            wait_for(dicom_echo(dicom_port, NODE_AE), 30, 0.1, "serve's SCP")
    except BaseException:
        node.stop()
        raise
    return node


def report_ready(api_url: str, report_id: str) -> bool:
    request = urllib.request.Request(
        f"{api_url}/fhir/DiagnosticReport/{report_id}",
        headers={"Authorization": f"Bearer {TOKEN}", "Accept": "application/fhir+json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.loads(response.read()).get("status") in READY_REPORT
    except urllib.error.HTTPError as exc:
        if exc.code == 404:  # not registered yet
            return False
        raise


# --------------------------------------------------------------------------- one study


@dataclass
class StudyTiming:
    study_uid: str
    send_seconds: float  # storescu's wall time (the C-STORE itself, not counted)
    pacs_seconds: float  # last C-STORE response -> SR and SEG in Orthanc
    fhir_seconds: float  # last C-STORE response -> DiagnosticReport preliminary
    peer_seconds: float  # plain storescu of the same SR + SEG into the same Orthanc
    stages: dict[str, float] = field(default_factory=dict)  # ledger times after t0


def measure_study(
    node: Node, orthanc: Orthanc, study: StudyFile, interval: float, timeout: float
) -> tuple[StudyTiming, float]:
    from node.fhir.resources import resource_id
    from sr_templates.series import derived_uid

    results = [
        str(derived_uid("sr", study.study_uid, 1, node=NODE_AE)),
        str(derived_uid("seg", study.study_uid, 1, node=NODE_AE)),
    ]
    report_id = resource_id("DiagnosticReport", study.study_uid)
    send = storescu(node.dicom_port, [study.path], NODE_AE)
    t0 = time.monotonic()
    t0_wall = time.time()
    pacs: float | None = None
    fhir: float | None = None
    while pacs is None or fhir is None:
        now = time.monotonic()
        if now - t0 > timeout:
            waiting = {"SR/SEG in Orthanc": pacs, "the report": fhir}
            missing = " and ".join(what for what, t in waiting.items() if t is None)
            raise BenchError(
                f"study {study.study_uid}: {missing} not there after {timeout:g} s "
                f"(node log: {[p.describe() for p in node.processes]})"
            )
        if pacs is None and orthanc.has_all(results):
            pacs = time.monotonic() - t0
        if fhir is None and report_ready(node.api_url, report_id):
            fhir = time.monotonic() - t0
        time.sleep(interval)
    folder = node.data_dir / "results" / study.study_uid
    peer = storescu(orthanc.dicom_port, [folder / "sr-v1.dcm", folder / "seg-v1.dcm"], "ORTHANC")
    return StudyTiming(study.study_uid, send, pacs, fhir, peer), t0_wall


def ledger_stages(data_dir: Path, timings: list[StudyTiming], t0s: list[float]) -> None:
    """Fill each timing's stages from the ledger: seconds after t0 of each recorded event."""
    db = sqlite3.connect(f"file:{data_dir / 'ledger.sqlite3'}?mode=ro", uri=True)
    try:
        for timing, t0 in zip(timings, t0s, strict=True):
            row = db.execute(
                "SELECT completed_at, queued_at, started_at, finished_at FROM studies "
                "WHERE study_uid = ? AND version = 1",
                (timing.study_uid,),
            ).fetchone()
            delivered = db.execute(
                "SELECT max(delivered_at) FROM outbox WHERE study_uid = ?", (timing.study_uid,)
            ).fetchone()
            names = ("completed", "queued", "started", "finished", "delivered")
            for name, value in zip(names, [*(row or ()), *(delivered or ())], strict=False):
                if value:
                    when = datetime.fromisoformat(str(value)).replace(tzinfo=UTC).timestamp()
                    timing.stages[name] = round(when - t0, 4)
    finally:
        db.close()


# --------------------------------------------------------------------------- summary


def _machine_busy_seconds() -> float:
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:]]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    """CPU seconds of this script and its reaped children (the storescu runs)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear between closest ranks (numpy's default)."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


@dataclass
class ModeResult:
    mode: str
    waits_seconds: float
    timings: list[StudyTiming]
    wall_seconds: float
    node_cpu_seconds: float
    other_load_cores: float

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mode": self.mode, "studies": len(self.timings)}
        peer = [t.peer_seconds for t in self.timings]
        out["peer_p50"], out["peer_p95"] = percentile(peer, 50), percentile(peer, 95)
        for target in ("pacs", "fhir"):
            beyond = [getattr(t, f"{target}_seconds") - self.waits_seconds for t in self.timings]
            out[f"{target}_p50"] = percentile(beyond, 50)
            out[f"{target}_p95"] = percentile(beyond, 95)
            out[f"{target}_max"] = max(beyond)
        stages: dict[str, float] = {}
        for name in ("completed", "queued", "started", "finished", "delivered"):
            seen = [t.stages[name] for t in self.timings if name in t.stages]
            if seen:
                stages[name] = statistics.median(seen)
        out["stage_medians"] = stages
        out["node_cpu_ms_per_study"] = 1000 * self.node_cpu_seconds / max(1, len(self.timings))
        out["other_load_cores"] = self.other_load_cores
        return out


def render(results: list[ModeResult]) -> str:
    head = (
        f"{'mode':<15} {'target':<6} {'n':>4} {'p50 s':>7} {'p95 s':>7} {'max s':>7} "
        f"{'peer p50':>9} {'peer p95':>9} {'p50/peer':>9} {'p95/peer':>9} {'waits s':>8}"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        s = r.summary()
        for target in ("pacs", "fhir"):
            p50, p95 = s[f"{target}_p50"], s[f"{target}_p95"]
            lines.append(
                f"{r.mode:<15} {target:<6} {s['studies']:>4} {p50:>7.3f} {p95:>7.3f} "
                f"{s[f'{target}_max']:>7.3f} {s['peer_p50']:>9.3f} {s['peer_p95']:>9.3f} "
                f"{p50 / s['peer_p50']:>9.1f} {p95 / s['peer_p95']:>9.1f} "
                f"{r.waits_seconds:>8.1f}"
            )
    lines.append("")
    lines.append("median seconds after the last C-STORE response (from the ledger):")
    for r in results:
        stages = r.summary()["stage_medians"]
        text = ", ".join(f"{k} {v:.3f}" for k, v in stages.items())
        lines.append(f"  {r.mode:<15} {text}")
    lines.append("")
    for r in results:
        s = r.summary()
        lines.append(
            f"  {r.mode:<15} node CPU {s['node_cpu_ms_per_study']:.0f} ms/study, "
            f"other load {s['other_load_cores']:.2f} cores, wall {r.wall_seconds:.0f} s"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def run_mode(
    mode: str, studies: list[StudyFile], work: Path, args: argparse.Namespace
) -> ModeResult:
    work.mkdir(parents=True, exist_ok=True)
    orthanc = start_orthanc(work / "orthanc")
    extra: dict[str, Any] = json.loads(args.node_settings) if args.node_settings else {}
    try:
        node = start_mode(mode, work, orthanc, args, extra)
        try:
            # one warm-up study (engine load, first connections), not counted
            warm = make_studies(args.data_dir, 1, 900_000 + MODES.index(mode), 256, 256)
            measure_study(node, orthanc, warm[0], args.interval, args.timeout + args.quiet_seconds)
            pids = [p.pid for p in node.processes]
            cpu0 = sum(tree_cpu_seconds(pid) for pid in pids)
            busy0, wall0 = _machine_busy_seconds(), time.monotonic()
            bench0 = _own_cpu_seconds()
            orthanc0 = tree_cpu_seconds(orthanc.process.pid)
            timings: list[StudyTiming] = []
            t0s: list[float] = []
            for i, study in enumerate(studies):
                timing, t0 = measure_study(
                    node, orthanc, study, args.interval, args.timeout + args.quiet_seconds
                )
                timings.append(timing)
                t0s.append(t0)
                if args.verbose:
                    print(
                        f"{mode} {i + 1}/{len(studies)} pacs {timing.pacs_seconds:.3f} "
                        f"fhir {timing.fhir_seconds:.3f} peer {timing.peer_seconds:.3f}",
                        flush=True,
                    )
            wall = time.monotonic() - wall0
            node_cpu = sum(tree_cpu_seconds(pid) for pid in pids) - cpu0
            # Orthanc, storescu and this script are part of the measurement, not other load
            orthanc_cpu = tree_cpu_seconds(orthanc.process.pid) - orthanc0
            ours = node_cpu + orthanc_cpu + _own_cpu_seconds() - bench0
            other = max(0.0, (_machine_busy_seconds() - busy0 - ours) / wall)
        finally:
            node.stop()
        ledger_stages(node.data_dir, timings, t0s)
    finally:
        orthanc.stop()
    waits = args.quiet_seconds if node.waits_quiet else 0.0
    return ModeResult(mode, waits, timings, wall, node_cpu, other)


def release_gaps(count: int, args: argparse.Namespace) -> tuple[list[float], list[Path]]:
    """Seconds from one association's end to the commit of the next one's first instance,
    for ``count`` back-to-back pairs (see the module docstring); and each pair's second
    file."""
    from pydicom import dcmread

    from node.synthetic import make_two_view_study, write_study

    work = args.work_dir / f"gaps-{secrets.token_hex(3)}"
    work.mkdir(parents=True, exist_ok=True)
    orthanc = start_orthanc(work / "orthanc")
    gaps: list[float] = []
    seconds: list[Path] = []
    try:
        # nothing completes between the two views: no grace time ending, no host check
        extra = {"completion": {"release_grace_seconds": 30.0, "release_host_idle_seconds": 30.0}}
        node = start_mode("serve", work, orthanc, args, extra)
        try:
            for i in range(count):
                folder = args.data_dir / f"two-view-{args.rows}x{args.cols}-s{args.seed + i}"
                files = sorted(folder.glob("*.dcm"))
                if len(files) != 2:
                    views = make_two_view_study(seed=args.seed + i, rows=args.rows, cols=args.cols)
                    files = write_study(folder, list(views))
                second = str(dcmread(files[1], stop_before_pixels=True).SOPInstanceUID)
                storescu(node.dicom_port, [files[0]], NODE_AE)
                ended = time.time()
                storescu(node.dicom_port, [files[1]], NODE_AE)
                db = sqlite3.connect(f"file:{node.data_dir / 'ledger.sqlite3'}?mode=ro", uri=True)
                try:
                    (received,) = db.execute(
                        "SELECT received_at FROM instances WHERE sop_instance_uid = ?", (second,)
                    ).fetchone()
                finally:
                    db.close()
                when = datetime.fromisoformat(str(received)).replace(tzinfo=UTC).timestamp()
                gaps.append(when - ended)
                seconds.append(files[1])
        finally:
            node.stop()
    finally:
        orthanc.stop()
    return gaps, seconds


def connect_gaps(files: Sequence[Path]) -> list[float]:
    """Seconds from starting a storescu of each file to a listening socket's accept of its
    connection: how soon a sender that starts a process per association (a shell loop of
    storescu) opens its next connection. The socket closes each connection unanswered."""
    gaps: list[float] = []
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.settimeout(10)
        port = listener.getsockname()[1]
        for path in files:
            started = time.monotonic()
            sender = subprocess.Popen(
                [str(DCMTK_BIN / "storescu"), "-aec", NODE_AE, "127.0.0.1", str(port), str(path)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                connection, _ = listener.accept()
                gaps.append(time.monotonic() - started)
                connection.close()
            except TimeoutError as exc:
                raise BenchError("storescu did not connect within 10 s") from exc
            finally:
                sender.wait(timeout=30)
    return gaps


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=100, help="studies per mode")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=["serve", "worker"])
    parser.add_argument("--quiet-seconds", type=float, default=5.0, help="completion.quiet_seconds")
    parser.add_argument("--rows", type=int, default=2500)
    parser.add_argument("--cols", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/14", help="worker mode broker")
    parser.add_argument(
        "--interval",
        type=float,
        default=0.05,
        help="poll interval, seconds (figures up to it late)",
    )
    parser.add_argument("--timeout", type=float, default=60.0, help="per study, seconds")
    parser.add_argument("--data-dir", type=Path, default=REPO / "bench/out/overhead-data")
    parser.add_argument("--work-dir", type=Path, default=REPO / "bench/out/overhead")
    parser.add_argument("--json", type=Path, default=REPO / "bench/out/overhead.json")
    parser.add_argument(
        "--node-settings",
        default="",
        help='extra node settings as JSON, e.g. \'{"outbox": {"poll_seconds": 1.0}}\'',
    )
    parser.add_argument("--verbose", action="store_true", help="a line per study")
    parser.add_argument(
        "--release-gaps",
        type=int,
        default=0,
        metavar="N",
        help="only measure N back-to-back association gaps (what the release grace covers)",
    )
    args = parser.parse_args(argv)
    if args.release_gaps > 0:
        try:
            pair_gaps, second_files = release_gaps(args.release_gaps, args)
            gaps = sorted(pair_gaps)
            connects = sorted(connect_gaps(second_files))
        except BenchError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(
            f"release gaps, {len(gaps)} pairs: p50 {percentile(gaps, 50):.3f} s, "
            f"p95 {percentile(gaps, 95):.3f} s, max {gaps[-1]:.3f} s"
        )
        print(
            f"next-connection gaps (process start to accept), {len(connects)}: "
            f"p50 {percentile(connects, 50):.3f} s, p95 {percentile(connects, 95):.3f} s, "
            f"max {connects[-1]:.3f} s"
        )
        return 0

    started = time.monotonic()
    results: list[ModeResult] = []
    try:
        for n, mode in enumerate(args.modes):
            studies = make_studies(
                args.data_dir, args.count, args.seed + 10_000 * n, args.rows, args.cols
            )
            work = args.work_dir / f"{mode}-{secrets.token_hex(3)}"
            results.append(run_mode(mode, studies, work, args))
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(render(results))
    print(f"\ntotal {time.monotonic() - started:.0f} s")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {
                "date": datetime.now(UTC).isoformat(timespec="seconds"),
                "argv": sys.argv,
                "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
                "summaries": [r.summary() for r in results],
                "studies": {r.mode: [asdict(t) for t in r.timings] for r in results},
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
