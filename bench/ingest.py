"""Ingest benchmark: our SCP against dcmtk ``storescp``, both fed by dcmtk ``storescu``.

The same synthetic CR files (2500 x 2048, 16 bits allocated: about 10 MB each
uncompressed, about 4.5 MB as JPEG 2000 lossless) go over loopback to

  ours      ``python -m node.cli serve`` (what ``medgemma-node serve`` runs): chunked receive
            to a temp file, header check, SHA-256, move into the spool, fsync of the file
            and its directory, a committed SQLite row (WAL, synchronous=FULL), then the
            C-STORE response;
  storescp  dcmtk ``storescp --fork +xa +B -pdu 131072``: writes the data set as
            received into the file, answers; no fsync, no database;

over one association (one ``storescu`` with every file) and over N concurrent ones
(N ``storescu`` processes, each with 1/N of the files). A run is timed from the start of
the first ``storescu`` to the exit of the last; then every file is checked to have
arrived (storescp: files in its output directory; ours: ``*.dcm`` in the spool and rows
in the ledger). A run with a missing file is an error, never a number. The row
``storescp+sync`` is the storescp run plus an ``os.sync()`` after the last sender exits:
the time until its files are on disk, which is what our SCP guarantees before it
answers.

Each run also records the receiver's CPU seconds (user + system, with storescp's forked
children), the senders' CPU seconds and the CPU the rest of the machine used meanwhile
("other load", in cores): on a shared 2-core machine the wall times move with other work,
the receiver's CPU per file much less. Runs alternate ours / storescp (ABAB, the order
flipping each repeat) to spread drift; the summary is the median of the repeats.

Settle: on a virtual machine whose balloon driver reports free memory back to the host
(virtio-balloon free page reporting, as on the machines these figures come from), memory a
guest freed is handed back after about 2 s, and writing to it again costs the guest a host
page fault per page: about 25 ms of system CPU per 10 MB file instead of 4, measured. Each
run removes its files at the end; a receiver that starts in milliseconds (storescp) would
then write into the memory just freed while ours, whose start takes seconds, writes into
memory already handed back. So every run's first file goes ``--settle`` seconds (default
5) after the previous run's files were removed, and both receivers write under the same
conditions. ``--settle 0`` restores the old behaviour (first file as soon as the receiver
answers C-ECHO).

Usage:
  python bench/ingest.py [--count 200] [--syntax explicit j2k] [--associations 1 4]
      [--repeat 1] [--settle 5] [--data-dir bench/out/data] [--json bench/out/ingest.json]
Needs dcmtk 3.6 (``/usr/bin/storescu``, ``storescp``; pynetdicom installs scripts of the
same names in the venv, so the dcmtk paths are explicit). Receivers are started and
stopped with bench/nodeproc.py and are ready when they answer C-ECHO.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.nodeproc import (  # noqa: E402
    NotReady,
    ServerProcess,
    dicom_echo,
    free_port,
    start_node,
)

DCMTK_BIN = Path(os.environ.get("DCMTK_BIN", "/usr/bin"))
STORESCU = DCMTK_BIN / "storescu"
STORESCP = DCMTK_BIN / "storescp"

OUR_AE = "MEDGEMMA"
PEER_AE = "STORESCP"
CALLING_AE = "BENCHSCU"

# storescu proposal per synthetic syntax name: JPEG 2000 lossless needs -xv, the rest of
# what node.synthetic writes is proposed by default (uncompressed) or by its own flag.
PROPOSE_FLAG = {
    "explicit": [],
    "implicit": [],
    "j2k": ["-xv"],
    "jpegls": ["-xt"],
    "rle": ["-xr"],
    "deflated": ["-xd"],
}
# --fork: one process per association (storescp serves one at a time otherwise); +B: write
# the data set as received, as our SCP does (and faster than storescp's default re-encode);
# -pdu: the largest receive PDU dcmtk allows (ours is unlimited; storescu sends 128 KiB
# PDUs to both).
STORESCP_ARGS = ["--fork", "-dhl", "+xa", "+B", "-pdu", "131072"]
GENERATE_PROCESSES = 2
OTHER_LOAD_WARNING = 0.25  # CPU cores busy with other work during a run


# --------------------------------------------------------------------------------------
# Data


@dataclass(frozen=True)
class DataSet:
    """One cached set of synthetic files of one transfer syntax."""

    syntax: str
    directory: Path
    files: tuple[Path, ...]
    total_bytes: int

    @property
    def mean_mb(self) -> float:
        return self.total_bytes / len(self.files) / 1e6


def _list_dcm(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.suffix == ".dcm" and p.is_file())


def ensure_data(
    data_dir: Path, syntax: str, count: int, rows: int, cols: int, seed: int
) -> DataSet:
    """The cached files for (syntax, count, size, seed), generated once with node.synthetic.

    Generation runs in GENERATE_PROCESSES processes, each writing a contiguous range of
    seeds (one study per seed, one instance per study), into a temporary directory that
    is renamed into place when every process has finished: a directory that exists is
    complete.
    """
    final = data_dir / f"cr-{rows}x{cols}-{syntax}-n{count}-seed{seed}"
    if final.is_dir():
        files = _list_dcm(final)
        if len(files) == count:
            print(f"data: reusing {count} {syntax} files in {final}", flush=True)
            return DataSet(syntax, final, tuple(files), sum(p.stat().st_size for p in files))
        print(f"data: {final} holds {len(files)} files, not {count}; regenerating", flush=True)
        shutil.rmtree(final)
    data_dir.mkdir(parents=True, exist_ok=True)
    for stale in data_dir.glob(f".{final.name}.*"):  # left by an interrupted generation
        shutil.rmtree(stale, ignore_errors=True)
    work = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=data_dir))
    processes = min(GENERATE_PROCESSES, count)
    share, extra = divmod(count, processes)
    procs: list[subprocess.Popen[bytes]] = []
    first = seed
    started = time.monotonic()
    print(f"data: generating {count} {syntax} files in {processes} processes ...", flush=True)
    for i in range(processes):
        n = share + (1 if i < extra else 0)
        argv = [
            sys.executable, "-m", "node.synthetic", str(work),
            "--count", str(n), "--syntax", syntax, "--seed", str(first),
            "--rows", str(rows), "--cols", str(cols),
        ]  # fmt: skip
        procs.append(
            subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        )
        first += n
    last_report = 0.0
    while any(p.poll() is None for p in procs):
        time.sleep(1.0)
        if time.monotonic() - last_report >= 15:
            last_report = time.monotonic()
            done = sum(1 for p in work.iterdir() if p.suffix == ".dcm")
            print(
                f"data:   {done}/{count} {syntax} files after {time.monotonic() - started:.0f} s",
                flush=True,
            )
    for p in procs:
        _out, err = p.communicate()
        if p.returncode != 0:
            shutil.rmtree(work, ignore_errors=True)
            raise BenchError(f"node.synthetic failed ({p.returncode}): {err.decode().strip()}")
    files = _list_dcm(work)
    if len(files) != count:
        shutil.rmtree(work, ignore_errors=True)
        raise BenchError(f"node.synthetic wrote {len(files)} files, expected {count} (UID clash?)")
    work.rename(final)
    files = _list_dcm(final)
    total = sum(p.stat().st_size for p in files)
    took = time.monotonic() - started
    print(f"data: {count} {syntax} files, {total / 1e6:.0f} MB, in {took:.0f} s", flush=True)
    return DataSet(syntax, final, tuple(files), total)


def warm_page_cache(data: DataSet) -> None:
    """Read every file once so that no run pays for the first read from disk."""
    for path in data.files:
        with path.open("rb") as f:
            while f.read(1 << 24):
                pass


# --------------------------------------------------------------------------------------
# Receivers


class BenchError(Exception):
    """The benchmark cannot produce a number (a receiver failed, a file went missing)."""


def dcmtk_environment(nagle: bool) -> dict[str, str]:
    """The environment for dcmtk tools: Nagle's algorithm off unless ``nagle``.

    dcmtk 3.6.7 leaves Nagle on by default (environment variable TCP_NODELAY unset = 0).
    Then storescp's small C-STORE response waits for the sender's delayed ACK, about 40 ms
    per file on Linux, and a run measures TCP timers instead of the receiver.
    """
    env = dict(os.environ)
    if not nagle:
        env["TCP_NODELAY"] = "1"
    return env


class Receiver:
    name: str
    ae_title: str
    proc: ServerProcess | None = None

    def start(self, run_dir: Path, log: Path) -> int:
        """Start listening; return the port once C-ECHO is answered."""
        raise NotImplementedError

    def received(self) -> int:
        """How many instances were received and stored (verified after a run)."""
        raise NotImplementedError

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop(timeout=30)
            self.proc = None

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid


class OurScp(Receiver):
    """``medgemma-node serve`` with the demo engine and completion pushed out of reach."""

    name = "ours"
    ae_title = OUR_AE

    def __init__(self, receiver_processes: int = 1, name: str = "ours") -> None:
        self.proc: ServerProcess | None = None
        self.data_dir: Path | None = None
        self.receiver_processes = receiver_processes  # dicom.receiver_processes
        self.name = name  # "ours", or "ours-pN" for a further --receiver-processes value

    def start(self, run_dir: Path, log: Path) -> int:
        port = free_port()
        self.data_dir = run_dir / "node"
        tmp = run_dir / "tmp"  # pynetdicom's chunked temp files: same disk, so a rename
        tmp.mkdir(parents=True)
        env = {
            "MEDGEMMA_NODE_DICOM__PORT": str(port),
            "MEDGEMMA_NODE_DICOM__BIND_ADDRESS": "127.0.0.1",
            "MEDGEMMA_NODE_DICOM__AE_TITLE": OUR_AE,
            "MEDGEMMA_NODE_API__HOST": "127.0.0.1",
            "MEDGEMMA_NODE_API__PORT": str(free_port()),
            "MEDGEMMA_NODE_STORAGE__DATA_DIR": str(self.data_dir),
            "MEDGEMMA_NODE_STORAGE__MIN_FREE_MB": "0",
            # no study completes (and no pre-read competes) during the run
            "MEDGEMMA_NODE_COMPLETION__QUIET_SECONDS": "3600",
            "MEDGEMMA_NODE_COMPLETION__ON_ASSOCIATION_RELEASE": "false",
            "MEDGEMMA_NODE_ENGINE__NAME": "demo",
            "MEDGEMMA_NODE_QUEUE__BROKER_URL": "",
            "MEDGEMMA_NODE_DICOM__RECEIVER_PROCESSES": str(self.receiver_processes),
            "TMPDIR": str(tmp),
        }
        try:
            self.proc = start_node(
                ["serve"], log=log, env=env, ready=lambda p: dicom_echo(port, OUR_AE),
                what=f"our SCP on port {port} to answer C-ECHO",
            )  # fmt: skip
        except NotReady as exc:
            raise BenchError(str(exc)) from None
        return port

    def received(self) -> int:
        assert self.data_dir is not None
        spool = self.data_dir / "spool"
        on_disk = sum(1 for _ in spool.rglob("*.dcm")) if spool.is_dir() else 0
        parts = sum(1 for _ in spool.rglob("*.part")) if spool.is_dir() else 0
        with sqlite3.connect(self.data_dir / "ledger.sqlite3") as db:
            (rows,) = db.execute("SELECT count(*) FROM instances").fetchone()
        if parts or rows != on_disk:
            raise BenchError(
                f"our spool holds {on_disk} files and {parts} partial files; "
                f"the ledger {rows} instances"
            )
        return on_disk


class DcmtkStorescp(Receiver):
    """dcmtk ``storescp``, one forked child per association, writing to ``-od``."""

    name = "storescp"
    ae_title = PEER_AE

    def __init__(self, extra_args: Sequence[str], env: dict[str, str]) -> None:
        self.extra_args = list(extra_args)
        self.env = env
        self.proc: ServerProcess | None = None
        self.out_dir: Path | None = None

    def start(self, run_dir: Path, log: Path) -> int:
        port = free_port()
        self.out_dir = run_dir / "storescp"
        self.out_dir.mkdir(parents=True)
        argv = [str(STORESCP), *self.extra_args, "-aet", PEER_AE, "-od", str(self.out_dir)]
        self.proc = ServerProcess([*argv, str(port)], log=log, env=self.env, name="storescp")
        try:
            self.proc.wait_ready(dicom_echo(port, PEER_AE), f"storescp on port {port}")
        except NotReady as exc:
            self.stop()
            raise BenchError(str(exc)) from None
        return port

    def received(self) -> int:
        assert self.out_dir is not None
        return sum(1 for p in self.out_dir.iterdir() if p.is_file())


# --------------------------------------------------------------------------------------
# Runs


_TICK = os.sysconf("SC_CLK_TCK")


def _proc_stat(pid: int) -> tuple[int, float, float] | None:
    """(parent pid, own CPU seconds, reaped children's CPU seconds), or None when gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()  # the name in parentheses may hold spaces
    own = (int(fields[11]) + int(fields[12])) / _TICK
    reaped = (int(fields[13]) + int(fields[14])) / _TICK
    return int(fields[1]), own, reaped


def tree_cpu_seconds(root: int) -> float:
    """CPU seconds (user + system) of a process, its reaped children and its live ones.

    storescp --fork serves each association in a child: once reaped, its time is in the
    parent's children times; until then (running, or exited but not yet reaped) it is
    read from the child itself.
    """

    def snapshot() -> tuple[tuple[int, float, float], float]:
        own = _proc_stat(root)
        if own is None:
            raise BenchError(f"receiver process {root} is gone")
        live = 0.0
        for entry in os.scandir("/proc"):
            if entry.name.isdigit() and int(entry.name) != root:
                info = _proc_stat(int(entry.name))
                if info is not None and info[0] == root:
                    live += info[1] + info[2]
        return own, live

    before, live = snapshot()
    for _ in range(5):
        if _proc_stat(root) == before:  # no child was reaped during the scan
            break
        before, live = snapshot()
    _ppid, own, reaped = before
    return own + reaped + live


def _machine_busy_seconds() -> float:
    """CPU seconds all CPUs spent not idle since boot (from /proc/stat)."""
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:]]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    return (sum(ticks[:8]) - idle) / _TICK


@dataclass
class RunResult:
    syntax: str
    associations: int
    receiver: str
    repeat: int
    files: int
    bytes: int
    seconds: float
    receiver_cpu_s: float  # the receiver process (and its forked children)
    senders_cpu_s: float  # every storescu
    other_cpu_cores: float  # busy CPU not used by receiver or senders, per second of run
    load1_before: float  # 1-minute load average when the run started
    sync_seconds: float | None = None  # storescp only: os.sync() after the last sender

    @property
    def files_per_s(self) -> float:
        return self.files / self.seconds

    @property
    def mb_per_s(self) -> float:
        return self.bytes / 1e6 / self.seconds


def send(
    data: DataSet,
    port: int,
    ae_title: str,
    associations: int,
    log_dir: Path,
    env: dict[str, str],
) -> float:
    """Send every file with ``associations`` concurrent storescu; wall seconds to the last exit."""
    chunks = [list(data.files[i::associations]) for i in range(associations)]
    argv = [str(STORESCU), "-aet", CALLING_AE, "-aec", ae_title, *PROPOSE_FLAG[data.syntax]]
    logs = [(log_dir / f"storescu-{i}.log").open("wb") for i in range(associations)]
    try:
        started = time.perf_counter()
        procs = [
            subprocess.Popen(
                [*argv, "127.0.0.1", str(port), *map(str, chunk)],
                env=env,
                stdout=logs[i],
                stderr=subprocess.STDOUT,
            )
            for i, chunk in enumerate(chunks)
        ]
        codes = [p.wait() for p in procs]
        elapsed = time.perf_counter() - started
    finally:
        for f in logs:
            f.close()
    failed = [i for i, code in enumerate(codes) if code != 0]
    if failed:
        raise BenchError(
            f"storescu {failed} exited with {[codes[i] for i in failed]}; "
            f"see {log_dir}/storescu-<n>.log"
        )
    return elapsed


#: When the previous run's files were removed (time.monotonic()), for ``--settle``.
_last_cleanup = [0.0]


def run_once(
    receiver: Receiver,
    data: DataSet,
    associations: int,
    repeat: int,
    work_root: Path,
    log_dir: Path,
    sender_env: dict[str, str],
    settle: float = 0.0,
) -> RunResult:
    """One timed run. The first file is sent ``settle`` seconds after the previous run's
    files were removed, whatever the receiver's start-up time (``--settle``)."""
    run_dir = Path(tempfile.mkdtemp(prefix=f"{receiver.name}-", dir=work_root))
    tag = f"{data.syntax}-a{associations}-{receiver.name}"
    run_logs = log_dir / tag
    run_logs.mkdir(parents=True, exist_ok=True)
    try:
        os.sync()  # the previous run's writes and deletions do not land in this one
        port = receiver.start(run_dir, run_logs / "receiver.log")
        try:
            assert receiver.pid is not None
            time.sleep(max(0.0, _last_cleanup[0] + settle - time.monotonic()))
            load1 = os.getloadavg()[0]
            cpu0 = tree_cpu_seconds(receiver.pid)
            busy0, senders0 = _machine_busy_seconds(), os.times()
            seconds = send(data, port, receiver.ae_title, associations, run_logs, sender_env)
            busy1, senders1 = _machine_busy_seconds(), os.times()
            receiver_cpu = tree_cpu_seconds(receiver.pid) - cpu0
            senders_cpu = (senders1.children_user - senders0.children_user) + (
                senders1.children_system - senders0.children_system
            )
            other = max(0.0, (busy1 - busy0) - receiver_cpu - senders_cpu) / seconds
            sync_seconds = None
            if isinstance(receiver, DcmtkStorescp):
                t = time.perf_counter()
                os.sync()
                sync_seconds = time.perf_counter() - t
            received = receiver.received()
        finally:
            receiver.stop()
        if received != len(data.files):
            raise BenchError(
                f"{receiver.name} stored {received} of {len(data.files)} {data.syntax} files "
                f"over {associations} association(s); see {run_logs}"
            )
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
        _last_cleanup[0] = time.monotonic()
    result = RunResult(
        data.syntax, associations, receiver.name, repeat, len(data.files), data.total_bytes,
        round(seconds, 3), round(receiver_cpu, 2), round(senders_cpu, 2), round(other, 2),
        round(load1, 2), None if sync_seconds is None else round(sync_seconds, 3),
    )  # fmt: skip
    extra = f" (+{sync_seconds:.2f} s sync)" if sync_seconds is not None else ""
    print(
        f"run: {tag:<24} repeat {repeat}: {seconds:7.2f} s{extra}, "
        f"{result.files_per_s:6.1f} files/s, {result.mb_per_s:7.1f} MB/s; CPU s: receiver "
        f"{receiver_cpu:.1f}, senders {senders_cpu:.1f}, other load {other:.2f} cores",
        flush=True,
    )
    return result


@dataclass
class SummaryRow:
    syntax: str
    associations: int
    receiver: str
    files: int
    mean_mb: float
    seconds: float  # median over repeats
    files_per_s: float
    mb_per_s: float
    ratio: float | None  # ours files/s divided by this row's files/s; None on the ours row
    receiver_cpu_ms_per_file: float  # median over repeats
    other_cpu_cores: float  # median background load during the runs
    repeats: list[float] = field(default_factory=list)


def summarise(results: list[RunResult], data: dict[str, DataSet]) -> list[SummaryRow]:
    """One row per (syntax, associations, receiver): medians over the repeats."""
    rows: list[SummaryRow] = []
    for syntax, assoc in sorted({(r.syntax, r.associations) for r in results}):
        group = [r for r in results if r.syntax == syntax and r.associations == assoc]
        ours = [r for r in group if r.receiver == "ours"]
        peer = [r for r in group if r.receiver == "storescp"]
        # further --receiver-processes values (ours-pN): their ratio is ours/ours-pN
        more = sorted({r.receiver for r in group} - {"ours", "storescp"})
        ds = data[syntax]
        n = len(ds.files)
        ours_s = statistics.median(r.seconds for r in ours)
        variants = (
            ("ours", ours, [r.seconds for r in ours]),
            *(
                (m, runs, [r.seconds for r in runs])
                for m in more
                for runs in [[r for r in group if r.receiver == m]]
            ),
            ("storescp", peer, [r.seconds for r in peer]),
            ("storescp+sync", peer, [r.seconds + (r.sync_seconds or 0.0) for r in peer]),
        )
        for name, runs, times in variants:
            s = statistics.median(times)
            rows.append(
                SummaryRow(
                    syntax, assoc, name, n, round(ds.mean_mb, 2), round(s, 3),
                    round(n / s, 2), round(ds.total_bytes / 1e6 / s, 1),
                    None if name == "ours" else round(s / ours_s, 3),
                    round(1000 * statistics.median(r.receiver_cpu_s for r in runs) / n, 1),
                    round(statistics.median(r.other_cpu_cores for r in runs), 2),
                    [round(t, 3) for t in times],
                )
            )  # fmt: skip
    return rows


def render(rows: list[SummaryRow]) -> str:
    head = (
        f"{'syntax':<9} {'assoc':>5} {'receiver':<14} {'files':>5} {'MB/file':>7} "
        f"{'seconds':>8} {'files/s':>8} {'MB/s':>7} {'ours/this':>9} "
        f"{'CPU ms/file':>11} {'other load':>10}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        ratio = "" if r.ratio is None else f"{r.ratio:.2f}"
        lines.append(
            f"{r.syntax:<9} {r.associations:>5} {r.receiver:<14} {r.files:>5} {r.mean_mb:>7.2f} "
            f"{r.seconds:>8.2f} {r.files_per_s:>8.1f} {r.mb_per_s:>7.1f} {ratio:>9} "
            f"{r.receiver_cpu_ms_per_file:>11.1f} {r.other_cpu_cores:>10.2f}"
        )
    return "\n".join(lines)


def _dcmtk_version() -> str:
    out = subprocess.run([str(STORESCP), "--version"], capture_output=True, text=True).stdout
    return out.splitlines()[0].strip() if out else "unknown"


def environment() -> dict[str, Any]:
    import pydicom
    import pynetdicom

    return {
        "python": platform.python_version(),
        "pydicom": pydicom.__version__,
        "pynetdicom": pynetdicom.__version__,
        "dcmtk": _dcmtk_version(),
        "storescp_args": STORESCP_ARGS,
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Ingest throughput of our SCP against dcmtk storescp (loopback, storescu)."
    )
    parser.add_argument("--count", type=int, default=200, help="files per syntax (default 200)")
    parser.add_argument(
        "--syntax", nargs="+", default=["explicit", "j2k"], choices=sorted(PROPOSE_FLAG)
    )
    parser.add_argument("--associations", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--repeat", type=int, default=1, help="runs per receiver (median)")
    parser.add_argument("--rows", type=int, default=2500)
    parser.add_argument("--cols", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0, help="first seed of the synthetic set")
    parser.add_argument(
        "--data-dir", type=Path, default=REPO / "bench/out/data", help="cache of generated files"
    )
    parser.add_argument(
        "--work-dir",
        type=Path,
        help="where receivers write (default: next to --data-dir, so on the same disk)",
    )
    parser.add_argument("--json", type=Path, default=REPO / "bench/out/ingest.json")
    parser.add_argument(
        "--dcmtk-nagle",
        action="store_true",
        help="leave Nagle's algorithm on in storescu and storescp (dcmtk's default; "
        "adds a delayed-ACK wait of about 40 ms per file to storescp)",
    )
    parser.add_argument(
        "--storescp-args",
        default=" ".join(STORESCP_ARGS),
        help=f"options for storescp (default: {' '.join(STORESCP_ARGS)!r})",
    )
    parser.add_argument(
        "--receiver-processes",
        type=int,
        nargs="+",
        default=[1],
        help="ours: dicom.receiver_processes (default 1: one process receives); further "
        "values add receivers ours-pN, run in the same alternation (e.g. 2 1: ours with 2, "
        "ours-p1 with 1, ratio ours/ours-p1)",
    )
    parser.add_argument(
        "--settle",
        type=float,
        default=5.0,
        help="seconds from the end of one run (its files removed) to the first file of the "
        "next, the same for every receiver (default 5; see 'Settle' in the module text)",
    )
    args = parser.parse_args(argv)
    if args.settle < 0:
        parser.error("--settle must be at least 0")
    if min(args.receiver_processes) < 1:
        parser.error("--receiver-processes must be at least 1")
    if args.count < 1 or args.repeat < 1 or min(args.associations) < 1:
        parser.error("--count, --repeat and --associations must be at least 1")
    for tool in (STORESCU, STORESCP):
        if not tool.is_file():
            print(f"ingest: {tool} not found; install dcmtk or set DCMTK_BIN", file=sys.stderr)
            return 2

    started = time.monotonic()
    data_dir: Path = args.data_dir.resolve()
    work_root: Path = (args.work_dir or data_dir.parent / "recv").resolve()
    log_dir = data_dir.parent / "logs"
    work_root.mkdir(parents=True, exist_ok=True)
    try:
        data = {
            s: ensure_data(data_dir, s, args.count, args.rows, args.cols, args.seed)
            for s in args.syntax
        }
    except BenchError as exc:
        print(f"ingest: {exc}", file=sys.stderr)
        return 1
    storescp_args = args.storescp_args.split()
    env = dcmtk_environment(args.dcmtk_nagle)
    first, *more = args.receiver_processes
    receivers: list[Receiver] = [
        OurScp(first),
        *(OurScp(n, name=f"ours-p{n}") for n in more),
        DcmtkStorescp(storescp_args, env),
    ]
    results: list[RunResult] = []
    try:
        for syntax in args.syntax:
            warm_page_cache(data[syntax])
            for assoc in args.associations:
                for rep in range(args.repeat):
                    order = receivers if rep % 2 == 0 else receivers[::-1]
                    for receiver in order:
                        results.append(
                            run_once(
                                receiver,
                                data[syntax],
                                assoc,
                                rep,
                                work_root,
                                log_dir,
                                env,
                                settle=args.settle,
                            )
                        )
    except BenchError as exc:
        print(f"ingest: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        for receiver in receivers:
            receiver.stop()
        return 130

    rows = summarise(results, data)
    busy = [r for r in results if r.other_cpu_cores > OTHER_LOAD_WARNING]
    if busy:
        print(
            f"\nwarning: {len(busy)} of {len(results)} runs had more than "
            f"{OTHER_LOAD_WARNING} CPU cores busy with other work (up to "
            f"{max(r.other_cpu_cores for r in busy):.2f}); their times are not clean. "
            "Run on an idle machine, or use --repeat 3.",
        )
    print()
    print(render(rows))
    print(
        f"\nours: {first} receiving process(es) (dicom.receiver_processes; ours-pN: N), "
        "chunked receive, SHA-256, fsync of file + directory and a committed SQLite "
        "row\n      (synchronous=FULL) before each C-STORE response. storescp: writes the "
        "file, no fsync.\nstorescp+sync: the storescp run plus os.sync() after the last "
        "sender exited.\nours/this = ours files/s / this row's files/s (1.00 = as fast; "
        "below 1 = ours slower).\nCPU ms/file: the receiver's CPU (user + system) per file. "
        "other load: CPU cores busy with\nanything but receiver and senders during the "
        f"run. Medians of {args.repeat} repeat(s); loopback, {os.cpu_count()} CPUs; dcmtk "
        f"Nagle {'on (dcmtk default)' if args.dcmtk_nagle else 'off (TCP_NODELAY=1)'}.",
    )
    elapsed = time.monotonic() - started
    print(f"total {elapsed:.0f} s")
    report = {
        "benchmark": "ingest",
        "count": args.count,
        "rows": args.rows,
        "cols": args.cols,
        "repeat": args.repeat,
        "receiver_processes": args.receiver_processes,
        "environment": {
            **environment(),
            "storescp_args": storescp_args,
            "dcmtk_tcp_nodelay": not args.dcmtk_nagle,
        },
        "data": {
            s: {"directory": str(d.directory), "files": len(d.files), "bytes": d.total_bytes}
            for s, d in data.items()
        },
        "runs": [
            {**asdict(r), "files_per_s": round(r.files_per_s, 2), "mb_per_s": round(r.mb_per_s, 1)}
            for r in results
        ],
        "summary": [asdict(r) for r in rows],
        "total_seconds": round(elapsed, 1),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
