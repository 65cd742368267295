"""FHIR API benchmark: DiagnosticReport search and $ask, against a trivial FastAPI peer.

Two servers, each its own process on loopback, same uvicorn (same loop and HTTP
implementation), measured in the same run:

  ours   ``python -m node.cli api``: bearer-token check, search in the SQLite store (WAL,
         synchronous=FULL), a searchset Bundle, an AuditEvent per request (batched), one
         log line per request; ``$ask`` stores the question Communication and its job
         (one committed write) and sends the task by name to Redis (Celery), then answers
         202 Accepted with Content-Location (model time is excluded: no worker consumes
         the queue, which is deleted afterwards);
  peer   a FastAPI app with one GET and one POST route answering static JSON bytes of the
         same size as ours (the search Bundle; the 202 OperationOutcome), no auth, no
         database: what FastAPI + uvicorn cost by themselves.

50 concurrent clients (asyncio + httpx, one process, keep-alive) send requests for a fixed
time after a warm-up; runs alternate ours / peer (the order flipping each repeat) and the
summary is the median of the repeats: requests/s, p50 and p99 latency, and ours/peer
ratios. The load generator shares the machine's cores with the server under test: the
peer's numbers show that ceiling.

Usage:
  python bench/fhir_api.py [--clients 50] [--seconds 5] [--repeat 2] [--studies 200]
      [--redis redis://127.0.0.1:6379/15] [--json bench/out/fhir_api.json] [--quick]
      [--profile DIR] [--only search|ask]

``--profile DIR``: py-spy (``pip install py-spy``) samples our server during each of its
runs and writes the folded stacks to ``DIR/<workload>.folded`` and, on stdout, where its
time went: the share of samples in each part of a request (token check, SQL, Bundle
building, validation, audit, logging, the Celery send, the framework). Profiled runs are
slower (the sampler takes CPU from the same cores): take figures from a run without it.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import hashlib
import json
import os
import platform
import random
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request, Response

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.nodeproc import (  # noqa: E402
    NotReady,
    ServerProcess,
    free_port,
    http_ok,
    start_node,
)
from sr_templates.model import Anchor, Measurements, PrereadResult, Region, ViewRef  # noqa: E402

TOKEN = "bench-" + secrets.token_hex(8)
PATIENTS_PER_STUDY = 4  # each patient has this many reports (a search returns them all)
#: (method, host, port, target, headers, body) of one request of the load
Request_ = tuple[str, str, int, str, dict[str, str], bytes]


# --------------------------------------------------------------------------------------
# Data


def _anchor(n: int, uid: str, sop: str) -> Anchor:
    """Finding anchor ``A<n>``: an 8.0 x 7.5 mm right upper zone nodule (0.2 mm pixels)."""
    return Anchor(
        anchor_id=f"A{n}", tracking_uid=uid, label="right upper zone nodule", kind="finding",
        finding="nodule", site="right_upper_zone", laterality="right",
        region=Region(100.0 * n, 100.0, 100.0 * n + 40, 140.0, "ellipse"),
        source_sop_instance_uid=sop,
        measurements=Measurements(8.0, 7.5, 47.1, "mm", "ImagerPixelSpacing"),
        attributes={"margin": "smooth"},
    )  # fmt: skip


def seed_store(url: str, studies: int) -> tuple[list[str], list[str]]:
    """``studies`` pre-read studies (two findings each) in the ledger and FHIR store.

    Returns (patient ids, DiagnosticReport ids).
    """
    from pydicom.uid import generate_uid

    from node.fhir.projection import record_preread
    from node.fhir.resources import IdentifierSystems, report_id
    from node.fhir.store import FhirStore
    from node.ledger import InstanceHeader, StudyLedger

    ledger = StudyLedger(url)
    store = FhirStore(ledger)
    systems = IdentifierSystems("urn:oid:1.2.840.99999.1", "urn:oid:1.2.840.99999.2")
    patients: list[str] = []
    reports: list[str] = []
    for i in range(studies):
        patient = f"PAT{i // PATIENTS_PER_STUDY:05d}"
        if not patients or patients[-1] != patient:
            patients.append(patient)
        uid, sop = generate_uid(), generate_uid()
        header = InstanceHeader(
            study_uid=uid, series_uid=generate_uid(), sop_instance_uid=sop,
            sop_class_uid="1.2.840.10008.5.1.4.1.1.1", transfer_syntax_uid="1.2.840.10008.1.2.1",
            modality="CR", body_part="CHEST", view_position="PA", study_description="CHEST PA",
            patient_id=patient, accession_number=f"ACC{i:06d}",
            study_date=f"2025{1 + i % 12:02d}{1 + i % 28:02d}",
        )  # fmt: skip
        out = ledger.record_instance(
            header, path=f"{uid}/{sop}.dcm", sha256=hashlib.sha256(sop.encode()).hexdigest(),
            size_bytes=1, revision=1, calling_ae="BENCH",
        )  # fmt: skip
        ledger.complete_studies([out.study_id])
        ledger.mark_queued(uid, 1, "bench")
        ledger.start_run(uid, 1)
        anchors = [_anchor(1, generate_uid(), sop), _anchor(2, generate_uid(), sop)]
        result = PrereadResult(
            notice="AI-generated, preliminary, not a diagnosis", is_demo=False,
            engine="bench", model_id="google/medgemma-4b-it", model_revision="main",
            prompt_version="bench", node_version="0.1.0", frontal=ViewRef(sop, "ViewPosition PA"),
            anchors=tuple(anchors), findings_text="Two small nodules in the right upper zone.",
            impression="Two nodules.", pixel_spacing_mm=(0.2, 0.2),
            spacing_source="ImagerPixelSpacing",
        )  # fmt: skip
        ledger.finish(uid, 1, ok=True, result=result)
        ledger.save_anchors(uid, 1, anchors)
        record_preread(ledger, uid, 1, systems=systems, store=store)
        reports.append(report_id(uid))
    store.close()
    ledger.close()
    return patients, reports


# --------------------------------------------------------------------------------------
# Servers


def peer_main(port: int, get_size: int, post_size: int) -> None:
    """The peer: static JSON of the given sizes on GET /search and POST /ask."""
    import uvicorn

    def padded(size: int, status: str) -> bytes:
        base = json.dumps({"resourceType": "Bundle", "status": status, "pad": ""})
        return base.replace('"pad": ""', '"pad": "' + "x" * max(0, size - len(base)) + '"').encode()

    search_body, ask_body = padded(get_size, "ok"), padded(post_size, "accepted")
    app = FastAPI()

    @app.get("/search")
    def search() -> Response:
        return Response(search_body, media_type="application/fhir+json")

    @app.post("/ask")
    async def ask(request: Request) -> Response:
        await request.body()
        return Response(ask_body, status_code=202, media_type="application/fhir+json")

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


# --------------------------------------------------------------------------------------
# Load


@dataclass
class Run:
    server: str
    workload: str
    requests: int
    errors: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    cpu_ms_per_request: float = float("nan")  # the server process's CPU time (Linux)
    load_1min: float = float("nan")  # the machine's load average after the run


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads); NaN where /proc is absent."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_idle(pid: int, timeout: float = 60.0) -> float:
    """Wait until the process uses under 2 % of a CPU over 0.5 s (or ``timeout``); return
    its CPU seconds then."""
    deadline = time.monotonic() + timeout
    before = process_cpu_seconds(pid)
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = process_cpu_seconds(pid)
        if not now - before >= 0.01:  # NaN (no /proc) stops too
            return now
        before = now
    return before


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(q * (len(ordered) - 1))))
    return ordered[k]


class Connection:
    """One keep-alive HTTP/1.1 connection (a minimal client: the load generator must cost
    far less than the servers it measures; httpx's async pool does not at 50 clients)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(
        self, method: str, target: str, headers: dict[str, str], body: bytes = b""
    ) -> int:
        """Send one request; return the status once the whole response body is read."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        lines = [
            f"{method} {target} HTTP/1.1",
            f"Host: {self.host}:{self.port}",
            f"Content-Length: {len(body)}",
            *(f"{k}: {v}" for k, v in headers.items()),
        ]
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        status_line = await self.reader.readline()
        status = int(status_line.split()[1])
        length = 0
        close = False
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            name, _, value = line.decode("latin-1").partition(":")
            if name.lower() == "content-length":
                length = int(value)
            elif name.lower() == "connection" and "close" in value.lower():
                close = True
        await self.reader.readexactly(length)
        if close:
            await self.close()
        return status

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


async def _load(
    make_request: Any, clients: int, seconds: float, warmup: float, expect: int
) -> tuple[list[float], int, float]:
    latencies: list[float] = []
    errors = 0
    start = time.perf_counter()
    measure_from = start + warmup
    stop_at = measure_from + seconds

    async def worker(n: int) -> None:
        nonlocal errors
        rng = random.Random(n)
        conn: Connection | None = None
        try:
            while True:
                t0 = time.perf_counter()
                if t0 >= stop_at:
                    return
                method, host, port, target, headers, body = make_request(rng)
                if conn is None:
                    conn = Connection(host, port)
                status = await conn.request(method, target, headers, body)
                t1 = time.perf_counter()
                if t0 >= measure_from:
                    latencies.append(t1 - t0)
                    if status != expect:
                        errors += 1
        finally:
            if conn is not None:
                await conn.close()

    await asyncio.gather(*(worker(n) for n in range(clients)))
    return latencies, errors, time.perf_counter() - measure_from


def measure(
    server: str,
    workload: str,
    make_request: Any,
    clients: int,
    seconds: float,
    expect: int,
    pid: int | None = None,
) -> Run:
    """One run; with ``pid``, the server's CPU time per request too (warm-up included on
    both sides of the division: all requests sent, all CPU used)."""
    counted: list[int] = []
    cpu0 = process_cpu_seconds(pid) if pid else float("nan")

    def counting(rng: random.Random) -> Request_:
        counted.append(1)
        return make_request(rng)  # type: ignore[no-any-return]

    latencies, errors, elapsed = asyncio.run(
        _load(counting, clients, seconds, min(1.0, seconds / 4), expect)
    )
    # work the requests left behind (AuditEvents, queue sends) counts too, and must not
    # run on during the next run (the other server's): wait until the server is idle
    cpu = wait_idle(pid) - cpu0 if pid else float("nan")
    return Run(
        server=server, workload=workload, requests=len(latencies), errors=errors,
        seconds=round(elapsed, 2), rps=round(len(latencies) / elapsed, 1),
        p50_ms=round(_percentile(latencies, 0.50) * 1000, 2),
        p99_ms=round(_percentile(latencies, 0.99) * 1000, 2),
        cpu_ms_per_request=round(1000 * cpu / max(1, len(counted)), 3),
        load_1min=round(os.getloadavg()[0], 2),
    )  # fmt: skip


# --------------------------------------------------------------------------------------
# Profile

#: Parts of a request, matched (first match wins) against the frames of a sampled stack,
#: innermost first: a sample counts for the innermost frame that names one of them.
PARTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("logging", ("logging/__init__.py", "logging/handlers.py", "node/logfmt.py")),
    ("token check", ("node/fhir/auth.py", "jwt/", "hashlib")),
    ("validation (fhir.resources)", ("fhir/resources/", "fhir_core", "pydantic")),
    ("Celery send", ("celery/", "kombu/", "redis/", "node/dispatch.py")),
    ("SQL", ("sqlalchemy/", "sqlite3", "psycopg")),
    ("AuditEvent", ("node/fhir/audit.py",)),
    ("Bundle / JSON", ("node/fhir/responses.py", "json/", "orjson")),
    ("search parsing", ("node/fhir/search.py", "node/fhir/search_sql.py")),
    ("question ($ask)", ("node/fhir/questions.py", "node/fhir/followups.py")),
    ("FHIR routes", ("node/fhir/",)),
    ("FastAPI / Starlette", ("fastapi/", "starlette/", "anyio/")),
    ("uvicorn / HTTP", ("uvicorn/", "h11/", "httptools")),
    ("asyncio loop", ("asyncio/", "selectors.py", "uvloop")),
)


def start_profiler(pid: int, out: Path, seconds: float) -> subprocess.Popen[bytes] | None:
    """py-spy recording ``pid`` for ``seconds``: the thread holding the GIL at each sample
    (``--gil``), so the shares are of the server's Python time, every thread counted."""
    exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(exe).exists():
        print("fhir_api bench: --profile needs py-spy (pip install py-spy)", file=sys.stderr)
        return None
    argv = [exe, "record", "--pid", str(pid), "--format", "raw", "--rate", "250", "--threads",
            "--gil", "--duration", str(max(1, round(seconds))), "--nonblocking",
            "-o", str(out)]  # fmt: skip
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def profile_parts(folded: Path) -> tuple[int, dict[str, int]]:
    """(samples, samples per part of :data:`PARTS`, "other" for the rest) of a folded file."""
    parts: collections.Counter[str] = collections.Counter()
    total = 0
    for line in folded.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")[::-1]  # innermost first
        parts[_part(frames)] += n
    return total, dict(parts.most_common())


def _part(frames: list[str]) -> str:
    for frame in frames:
        for name, needles in PARTS:
            if any(needle in frame for needle in needles):
                return name
    return "other"


def print_profile(directory: Path) -> dict[str, dict[str, float]]:
    """Print (and return) the share of samples per part for each profiled workload."""
    out: dict[str, dict[str, float]] = {}
    for folded in sorted(directory.glob("*.folded")):
        total, parts = profile_parts(folded)
        if not total:
            continue
        shares = {name: round(100 * n / total, 1) for name, n in parts.items()}
        out[folded.stem] = shares
        print(f"\nprofile of ours, {folded.stem}: {total} samples of the thread holding the GIL")
        for name, share in shares.items():
            print(f"  {name:<30}{share:6.1f} %")
    return out


# --------------------------------------------------------------------------------------
# Main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--studies", type=int, default=200)
    parser.add_argument(
        "--redis", default=os.environ.get("BENCH_REDIS", "redis://127.0.0.1:6379/15")
    )
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "out" / "fhir_api.json")
    parser.add_argument("--quick", action="store_true", help="1 s runs, 1 repeat, 20 studies")
    parser.add_argument("--only", choices=("search", "ask"), help="run one workload only")
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="py-spy our server during its runs; folded stacks in DIR")  # fmt: skip
    parser.add_argument("--peer", nargs=3, type=int, metavar=("PORT", "GET", "POST"),
                        help=argparse.SUPPRESS)  # fmt: skip
    args = parser.parse_args(argv)
    if args.peer:
        peer_main(*args.peer)
        return 0
    if args.quick:
        args.seconds, args.repeat, args.studies = 1.0, 1, 20

    import httpx
    import redis

    try:
        redis.Redis.from_url(args.redis, socket_timeout=3).ping()
    except redis.RedisError as exc:
        print(f"fhir_api bench: Redis at {args.redis} is needed for $ask: {exc}", file=sys.stderr)
        return 2

    work = Path(tempfile.mkdtemp(prefix="fhir-bench-"))
    queue = f"bench-followup-{secrets.token_hex(4)}"
    servers: list[ServerProcess] = []
    try:
        url = f"sqlite:///{work / 'var' / 'ledger.sqlite3'}"
        (work / "var").mkdir()
        t0 = time.monotonic()
        patients, reports = seed_store(url, args.studies)
        print(f"data: {args.studies} pre-read studies of {len(patients)} patients "
              f"in {time.monotonic() - t0:.1f} s", flush=True)  # fmt: skip

        ours_port, peer_port = free_port(), free_port()
        tokens = [{"name": "bench", "sha256": hashlib.sha256(TOKEN.encode()).hexdigest(),
                   "scopes": ["system/*.*"]}]  # fmt: skip
        env = {
            "MEDGEMMA_NODE_STORAGE__DATA_DIR": str(work / "var"),
            "MEDGEMMA_NODE_API__PORT": str(ours_port),
            "MEDGEMMA_NODE_QUEUE__BROKER_URL": args.redis,
            "MEDGEMMA_NODE_QUEUE__FOLLOWUP_QUEUE": queue,
            "MEDGEMMA_NODE_AUTH__TOKENS": json.dumps(tokens),
            "MEDGEMMA_NODE_FHIR__PATIENT_ID_SYSTEM": "urn:oid:1.2.840.99999.1",
        }
        base = f"http://127.0.0.1:{ours_port}/fhir"
        servers.append(start_node(["api"], log=work / "ours.log", env=env,
                                  ready=lambda p: http_ok(f"{base}/metadata"),
                                  what="our FHIR API"))  # fmt: skip
        auth = {"Authorization": f"Bearer {TOKEN}"}
        ask_body = json.dumps({"resourceType": "Parameters", "parameter": [
            {"name": "question", "valueString": "How large is A1?"}]}).encode()  # fmt: skip
        ask_headers = {**auth, "Content-Type": "application/fhir+json"}

        # the sizes the peer must match: one real search Bundle and one real 202
        sample = httpx.get(f"{base}/DiagnosticReport",
                           params={"patient.identifier": patients[0]}, headers=auth)  # fmt: skip
        accepted = httpx.post(f"{base}/DiagnosticReport/{reports[0]}/$ask", content=ask_body,
                              headers=ask_headers)  # fmt: skip
        assert sample.status_code == 200 and sample.json()["total"] == PATIENTS_PER_STUDY
        assert accepted.status_code == 202, accepted.text
        get_size, post_size = len(sample.content), len(accepted.content)
        peer = ServerProcess(
            [sys.executable, str(Path(__file__).resolve()), "--peer", str(peer_port),
             str(get_size), str(post_size)],
            log=work / "peer.log", name="FastAPI peer",
        )  # fmt: skip
        servers.append(peer)
        peer.wait_ready(http_ok(f"http://127.0.0.1:{peer_port}/search"), "the FastAPI peer")

        ours_host, query = "127.0.0.1", urllib.parse.urlencode

        def ours_search(rng: random.Random) -> Request_:
            target = "/fhir/DiagnosticReport?" + query({"patient.identifier": rng.choice(patients)})
            return "GET", ours_host, ours_port, target, auth, b""

        def ours_ask(rng: random.Random) -> Request_:
            target = f"/fhir/DiagnosticReport/{rng.choice(reports)}/$ask"
            return "POST", ours_host, ours_port, target, ask_headers, ask_body

        def peer_search(rng: random.Random) -> Request_:
            target = "/search?" + query({"patient.identifier": rng.choice(patients)})
            return "GET", ours_host, peer_port, target, {}, b""

        def peer_ask(rng: random.Random) -> Request_:
            return "POST", ours_host, peer_port, "/ask", ask_headers, ask_body

        workloads = {
            "search": ((ours_search, 200), (peer_search, 200)),
            "ask": ((ours_ask, 202), (peer_ask, 202)),
        }
        if args.only:
            workloads = {args.only: workloads[args.only]}
        runs: list[Run] = []
        for workload, ((ours_fn, ours_expect), (peer_fn, peer_expect)) in workloads.items():
            for r in range(args.repeat):
                order = [("ours", ours_fn, ours_expect), ("peer", peer_fn, peer_expect)]
                for name, fn, expect in order if r % 2 == 0 else order[::-1]:
                    spy = None
                    if args.profile is not None and name == "ours":
                        args.profile.mkdir(parents=True, exist_ok=True)
                        target = args.profile / f"{workload}-{r + 1}.folded"
                        spy = start_profiler(servers[0].pid, target, args.seconds + 1)
                    pid = servers[0 if name == "ours" else 1].pid
                    run = measure(name, workload, fn, args.clients, args.seconds, expect, pid)
                    if spy is not None:
                        spy.wait(timeout=60)
                    runs.append(run)
                    print(f"  {workload:<7} {name:<5} repeat {r + 1}: {run.rps:8.1f} req/s  "
                          f"p50 {run.p50_ms:7.2f} ms  p99 {run.p99_ms:7.2f} ms  "
                          f"CPU {run.cpu_ms_per_request:6.3f} ms/req  errors {run.errors}  "
                          f"load {run.load_1min:.1f}", flush=True)  # fmt: skip
        summary = summarise(runs)
        print_table(summary, args, get_size, post_size)
        profile = print_profile(args.profile) if args.profile is not None else {}
        report = {
            "benchmark": "fhir_api",
            "clients": args.clients, "seconds_per_run": args.seconds, "repeats": args.repeat,
            "studies": args.studies, "response_bytes": {"search": get_size, "ask": post_size},
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                        "platform": platform.platform()},
            "summary": summary, "runs": [asdict(r) for r in runs],
            "profile_percent": profile,
        }  # fmt: skip
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")
        errors = sum(r.errors for r in runs)
        return 0 if errors == 0 else 1
    except NotReady as exc:
        print(f"fhir_api bench: a server did not start: {exc}", file=sys.stderr)
        return 1
    finally:
        for server in servers:
            server.stop()
        try:
            redis.Redis.from_url(args.redis, socket_timeout=3).delete(queue)
        except redis.RedisError:
            pass
        shutil.rmtree(work, ignore_errors=True)


def summarise(runs: list[Run]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for workload in dict.fromkeys(r.workload for r in runs):
        row: dict[str, Any] = {}
        for server in ("ours", "peer"):
            mine = [r for r in runs if r.workload == workload and r.server == server]
            row[server] = {
                "rps": round(statistics.median(r.rps for r in mine), 1),
                "p50_ms": round(statistics.median(r.p50_ms for r in mine), 2),
                "p99_ms": round(statistics.median(r.p99_ms for r in mine), 2),
                "cpu_ms_per_request": round(
                    statistics.median(r.cpu_ms_per_request for r in mine), 3
                ),
                "errors": sum(r.errors for r in mine),
            }
        row["ratio"] = {
            "rps": round(row["ours"]["rps"] / row["peer"]["rps"], 3),
            "p50": round(row["ours"]["p50_ms"] / row["peer"]["p50_ms"], 2),
            "p99": round(row["ours"]["p99_ms"] / row["peer"]["p99_ms"], 2),
            "cpu_per_request": round(
                row["ours"]["cpu_ms_per_request"] / row["peer"]["cpu_ms_per_request"], 2
            ),
        }
        out[workload] = row
    return out


def print_table(
    summary: dict[str, dict[str, Any]], args: argparse.Namespace, get_size: int, post_size: int
) -> None:
    print()
    print(f"FHIR API, {args.clients} concurrent clients, {args.seconds:g} s x {args.repeat} "
          f"(median); responses {get_size} B (search), {post_size} B (ask 202)")  # fmt: skip
    print(f"{'workload':<10}{'server':<7}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}"
          f"{'CPU ms/req':>12}{'errors':>8}")  # fmt: skip
    for workload, row in summary.items():
        for server in ("ours", "peer"):
            s = row[server]
            print(f"{workload:<10}{server:<7}{s['rps']:>10.1f}{s['p50_ms']:>10.2f}"
                  f"{s['p99_ms']:>10.2f}{s['cpu_ms_per_request']:>12.3f}"
                  f"{s['errors']:>8}")  # fmt: skip
        ratio = row["ratio"]
        print(f"{workload:<10}{'ratio':<7}{ratio['rps']:>10.3f}{ratio['p50']:>10.2f}"
              f"{ratio['p99']:>10.2f}{ratio['cpu_per_request']:>12.2f}")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
