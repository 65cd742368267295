"""Node memory benchmark: resident memory of our SCP against dcmtk ``storescp`` under load.

Both receivers take the same synthetic CR files over N concurrent associations (dcmtk
``storescu``, one process per association, each with its share of the files; 20 x 50 by
default), started and checked exactly as bench/ingest.py does it (its receivers, data and
senders are imported, not copied):

  ours      ``python -m node.cli serve`` (what ``medgemma-node serve`` runs: SCP, FHIR API
            and the embedded worker with the demo engine, the quiet period out of reach so
            no pre-read runs; ``dicom.max_associations`` and ``max_associations_per_host``
            raised to N + 2, since every sender connects from 127.0.0.1): the serve process
            and every process below it;
  storescp  dcmtk ``storescp --fork``: the listening parent plus the child it forks for
            each association, summed.

While the senders run, a thread samples the receiver's process tree every ``--interval``
seconds (children found through ``/proc/<pid>/task/<tid>/children``): each process's RSS
from ``/proc/<pid>/statm`` at every sample, its PSS from ``/proc/<pid>/smaps_rollup`` at
every ``--pss-every``-th (the kernel walks the page tables for it: about 10 ms for our
serve process under load, a fifth of a core at every sample):

  RSS  resident set, summed over the tree. Pages shared between processes (storescp's
       forked children share the parent's code and libraries) count once per process,
       so a sum of RSS overstates a forking server;
  PSS  proportional set: each shared page split between the processes that map it, so
       the sum is the tree's real share of memory. The fairer of the two for the ratio.
       Processes are read one after another, not at one instant: a child that exits
       between the parent's reading and its own leaves its share of the parent's pages
       uncounted in that sample (storescp's children live as long as their association).

Reported per receiver: idle (median over a second before the first sender starts), peak
and median during the run (first sender started to last sender exited), and the most
processes seen at once; then ours/storescp for each. After a run every file is checked to
have arrived (storescp: files in its output directory; ours: ``*.dcm`` in the spool and
rows in the ledger): a missing file is an error, never a number.

Sampling misses spikes shorter than the interval; the sampler's own CPU time is reported
(on 2 shared cores it competes with the run). The commit measured is in the JSON.

Usage:
  python bench/node_memory.py [--associations 20] [--images 50] [--rows 1024 --cols 1024]
      [--interval 0.05] [--pss-every 5] [--repeat 1] [--json bench/out/node_memory.json]
Needs dcmtk 3.6 (``/usr/bin/storescu``, ``storescp``; see bench/README.md).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import bench.ingest  # noqa: E402
from bench.ingest import (  # noqa: E402
    PROPOSE_FLAG,
    STORESCP,
    STORESCP_ARGS,
    STORESCU,
    BenchError,
    DataSet,
    DcmtkStorescp,
    OurScp,
    Receiver,
    dcmtk_environment,
    ensure_data,
    environment,
    send,
    tree_cpu_seconds,
    warm_page_cache,
)

MB = 1 << 20  # memory is reported in MiB
IDLE_SECONDS = 1.0  # sampled before the first sender starts


# --------------------------------------------------------------------------------------
# Sampling


def process_tree(root: int) -> list[int]:
    """``root`` and every live process below it (children of any of its threads)."""
    found: list[int] = []
    pending = [root]
    while pending:
        pid = pending.pop()
        found.append(pid)
        try:
            threads = os.listdir(f"/proc/{pid}/task")
        except OSError:  # exited meanwhile
            continue
        for tid in threads:
            try:
                children = Path(f"/proc/{pid}/task/{tid}/children").read_text()
            except OSError:
                continue
            pending.extend(int(child) for child in children.split())
    return found


PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def process_rss(pid: int) -> int | None:
    """Resident set of one process in bytes; None when it is gone (a zombie reads 0)."""
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_SIZE
    except (OSError, IndexError, ValueError):
        return None


def process_pss(pid: int) -> int | None:
    """Proportional set of one process in bytes; None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024
    return 0  # a zombie: nothing mapped


@dataclass(frozen=True)
class Sample:
    t: float  # seconds since the sampler started
    rss: int  # bytes, summed over the tree
    pss: int | None  # None: not read at this sample (see --pss-every)
    processes: int


class TreeSampler:
    """A thread that samples the memory of a process tree every ``interval`` seconds."""

    def __init__(self, root: int, interval: float, pss_every: int) -> None:
        self.root = root
        self.interval = interval
        self.pss_every = pss_every
        self.samples: list[Sample] = []
        self.cpu_seconds = 0.0  # the sampler thread's own CPU time
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._started = 0.0

    def start(self) -> None:
        self._started = time.perf_counter()
        self._thread.start()

    def now(self) -> float:
        """Seconds on the samples' clock."""
        return time.perf_counter() - self._started

    def stop(self) -> list[Sample]:
        self._stop.set()
        self._thread.join()
        return self.samples

    def _run(self) -> None:
        cpu0 = time.thread_time()
        next_at = time.perf_counter()
        while not self._stop.is_set():
            with_pss = len(self.samples) % self.pss_every == 0
            rss = pss = processes = 0
            for pid in process_tree(self.root):
                resident = process_rss(pid)
                if resident is None:
                    continue
                rss, processes = rss + resident, processes + 1
                if with_pss:
                    pss += process_pss(pid) or 0
            self.samples.append(Sample(self.now(), rss, pss if with_pss else None, processes))
            next_at += self.interval
            self._stop.wait(max(0.0, next_at - time.perf_counter()))
        self.cpu_seconds = time.thread_time() - cpu0


# --------------------------------------------------------------------------------------
# Receivers


class LoadedScp(OurScp):
    """bench/ingest.py's ``serve`` receiver with the association limits raised to the run's
    concurrency: the defaults (``dicom.max_associations`` 16, ``max_associations_per_host``
    8) refuse most of 20 senders that all connect from 127.0.0.1.

    OurScp builds its environment inside ``start``; until it takes extra settings, the
    ``start_node`` it calls is wrapped for the call to add these (its own settings kept).
    """

    def __init__(self, associations: int) -> None:
        super().__init__()
        slots = str(associations + 2)  # + the readiness C-ECHO's connection, still closing
        self.settings = {
            "MEDGEMMA_NODE_DICOM__MAX_ASSOCIATIONS": slots,
            "MEDGEMMA_NODE_DICOM__MAX_ASSOCIATIONS_PER_HOST": slots,
        }

    def start(self, run_dir: Path, log: Path) -> int:
        with _node_settings(self.settings):
            return super().start(run_dir, log)


@contextlib.contextmanager
def _node_settings(settings: Mapping[str, str]) -> Iterator[None]:
    original = bench.ingest.start_node

    def start_node(*args: Any, env: Mapping[str, str] | None = None, **kwargs: Any) -> Any:
        return original(*args, env={**(env or {}), **settings}, **kwargs)

    bench.ingest.start_node = start_node
    try:
        yield
    finally:
        bench.ingest.start_node = original


# --------------------------------------------------------------------------------------
# Runs


@dataclass
class MemoryRun:
    receiver: str
    repeat: int
    files: int  # sent; every one was checked to have arrived
    seconds: float  # first sender started to last sender exited
    samples: int  # during the run (RSS; PSS in every pss_every-th of them)
    idle_rss_mib: float
    peak_rss_mib: float
    median_rss_mib: float
    idle_pss_mib: float
    peak_pss_mib: float
    median_pss_mib: float
    peak_processes: int
    receiver_cpu_s: float  # the receiver tree (storescp's forked children included)
    sampler_cpu_s: float
    load1_before: float  # 1-minute load average of the machine
    load1_after: float


def _mib(values: list[int], how: str) -> float:
    value = max(values) if how == "peak" else statistics.median(values)
    return round(value / MB, 1)


def measure(
    receiver: Receiver,
    data: DataSet,
    associations: int,
    repeat: int,
    interval: float,
    pss_every: int,
    work_root: Path,
    log_dir: Path,
    sender_env: dict[str, str],
) -> MemoryRun:
    """One receiver started fresh, sampled while ``associations`` storescu send every file."""
    run_dir = Path(tempfile.mkdtemp(prefix=f"{receiver.name}-", dir=work_root))
    run_logs = log_dir / f"memory-{receiver.name}-{repeat}"
    run_logs.mkdir(parents=True, exist_ok=True)
    try:
        os.sync()  # the previous run's writes do not land in this one
        port = receiver.start(run_dir, run_logs / "receiver.log")
        try:
            assert receiver.pid is not None
            load1 = os.getloadavg()[0]
            cpu0 = tree_cpu_seconds(receiver.pid)
            sampler = TreeSampler(receiver.pid, interval, pss_every)
            sampler.start()
            try:
                time.sleep(IDLE_SECONDS)
                begin = sampler.now()
                seconds = send(data, port, receiver.ae_title, associations, run_logs, sender_env)
                end = sampler.now()
            finally:
                samples = sampler.stop()
            receiver_cpu = tree_cpu_seconds(receiver.pid) - cpu0
            load1_after = os.getloadavg()[0]
            received = receiver.received()
        finally:
            receiver.stop()
        if received != len(data.files):
            raise BenchError(
                f"{receiver.name} stored {received} of {len(data.files)} files over "
                f"{associations} associations; see {run_logs}"
            )
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    idle = [s for s in samples if s.t < begin]
    busy = [s for s in samples if begin <= s.t <= end]
    idle_pss = [s.pss for s in idle if s.pss is not None]
    busy_pss = [s.pss for s in busy if s.pss is not None]
    if not idle_pss or not busy_pss:
        raise BenchError(
            f"{receiver.name}: too few memory samples (idle {len(idle)}, run {len(busy)}; "
            f"with PSS {len(idle_pss)} and {len(busy_pss)}): lower --interval or --pss-every"
        )
    result = MemoryRun(
        receiver=receiver.name,
        repeat=repeat,
        files=len(data.files),
        seconds=round(seconds, 2),
        samples=len(busy),
        idle_rss_mib=_mib([s.rss for s in idle], "median"),
        peak_rss_mib=_mib([s.rss for s in busy], "peak"),
        median_rss_mib=_mib([s.rss for s in busy], "median"),
        idle_pss_mib=_mib(idle_pss, "median"),
        peak_pss_mib=_mib(busy_pss, "peak"),
        median_pss_mib=_mib(busy_pss, "median"),
        peak_processes=max(s.processes for s in busy),
        receiver_cpu_s=round(receiver_cpu, 2),
        sampler_cpu_s=round(sampler.cpu_seconds, 2),
        load1_before=round(load1, 2),
        load1_after=round(load1_after, 2),
    )
    print(
        f"run: {receiver.name:<9} repeat {repeat}: {result.files} files in {seconds:6.2f} s; "
        f"RSS MiB idle {result.idle_rss_mib}, peak {result.peak_rss_mib}, median "
        f"{result.median_rss_mib}; PSS MiB peak {result.peak_pss_mib}, median "
        f"{result.median_pss_mib}; up to {result.peak_processes} processes; "
        f"{result.samples} samples",
        flush=True,
    )
    return result


MEASURES = (
    "idle_rss_mib",
    "peak_rss_mib",
    "median_rss_mib",
    "idle_pss_mib",
    "peak_pss_mib",
    "median_pss_mib",
)


def summarise(runs: list[MemoryRun]) -> dict[str, Any]:
    """Per receiver the median over repeats of every measure; ours/storescp for each."""
    summary: dict[str, Any] = {}
    for name in ("ours", "storescp"):
        mine = [r for r in runs if r.receiver == name]
        summary[name] = {
            m: round(statistics.median(getattr(r, m) for r in mine), 1) for m in MEASURES
        }
        summary[name]["peak_processes"] = max(r.peak_processes for r in mine)
        summary[name]["seconds"] = round(statistics.median(r.seconds for r in mine), 2)
    summary["ours_over_storescp"] = {
        m: round(summary["ours"][m] / summary["storescp"][m], 2) for m in MEASURES
    }
    return summary


def render(summary: dict[str, Any]) -> str:
    head = (
        f"{'receiver':<19}{'idle RSS':>9}{'peak RSS':>9}{'med RSS':>9}"
        f"{'idle PSS':>9}{'peak PSS':>9}{'med PSS':>9}{'procs':>6}{'seconds':>8}"
    )
    lines = [head, "-" * len(head)]
    for name in ("ours", "storescp"):
        row = summary[name]
        lines.append(
            f"{name:<19}" + "".join(f"{row[m]:>9.1f}" for m in MEASURES)
            + f"{row['peak_processes']:>6}{row['seconds']:>8.2f}"
        )  # fmt: skip
    ratio = summary["ours_over_storescp"]
    lines.append(f"{'ours/storescp':<19}" + "".join(f"{ratio[m]:>9.2f}" for m in MEASURES))
    return "\n".join(lines)


def measured_commit() -> dict[str, Any]:
    """The commit measured, and whether node/ or bench/ had uncommitted changes."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""

    return {
        "commit": git("rev-parse", "HEAD") or "unknown",
        "uncommitted": git("status", "--porcelain", "--", "node", "bench").splitlines(),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Resident memory of our SCP against dcmtk storescp under concurrent "
        "associations (loopback, storescu)."
    )
    parser.add_argument("--associations", type=int, default=20)
    parser.add_argument("--images", type=int, default=50, help="files per association")
    parser.add_argument("--syntax", default="explicit", choices=sorted(PROPOSE_FLAG))
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--cols", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0, help="first seed of the synthetic set")
    parser.add_argument("--interval", type=float, default=0.05, help="seconds between samples")
    parser.add_argument(
        "--pss-every", type=int, default=5, help="read PSS at every N-th sample (it costs more)"
    )
    parser.add_argument("--repeat", type=int, default=1, help="runs per receiver (median)")
    parser.add_argument(
        "--data-dir", type=Path, default=REPO / "bench/out/data", help="cache of generated files"
    )
    parser.add_argument(
        "--work-dir",
        type=Path,
        help="where receivers write (default: next to --data-dir, so on the same disk)",
    )
    parser.add_argument("--json", type=Path, default=REPO / "bench/out/node_memory.json")
    args = parser.parse_args(argv)
    if min(args.associations, args.images, args.repeat, args.pss_every) < 1 or args.interval <= 0:
        parser.error(
            "--associations, --images, --repeat and --pss-every must be at least 1, --interval > 0"
        )
    for tool in (STORESCU, STORESCP):
        if not tool.is_file():
            print(f"node_memory: {tool} not found; install dcmtk or set DCMTK_BIN", file=sys.stderr)
            return 2

    started = time.monotonic()
    count = args.associations * args.images
    data_dir: Path = args.data_dir.resolve()
    work_root: Path = (args.work_dir or data_dir.parent / "recv").resolve()
    log_dir = data_dir.parent / "logs"
    work_root.mkdir(parents=True, exist_ok=True)
    env = dcmtk_environment(nagle=False)
    receivers: list[Receiver] = [LoadedScp(args.associations), DcmtkStorescp(STORESCP_ARGS, env)]
    runs: list[MemoryRun] = []
    try:
        data = ensure_data(data_dir, args.syntax, count, args.rows, args.cols, args.seed)
        warm_page_cache(data)
        for rep in range(args.repeat):
            for receiver in receivers if rep % 2 == 0 else receivers[::-1]:
                runs.append(
                    measure(
                        receiver, data, args.associations, rep, args.interval,
                        args.pss_every, work_root,
                        log_dir, env,
                    )
                )  # fmt: skip
    except BenchError as exc:
        print(f"node_memory: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        for receiver in receivers:
            receiver.stop()
        return 130

    summary = summarise(runs)
    print()
    print(render(summary))
    print(
        f"\n{args.associations} associations x {args.images} {args.syntax} files "
        f"({args.rows} x {args.cols}, {data.mean_mb:.2f} MB each), storescu over loopback. "
        "MiB; medians of\n"
        f"{args.repeat} repeat(s). RSS and PSS summed over the receiver's process tree "
        f"(ours: serve and its children;\nstorescp: the parent and its forked children), "
        f"sampled every {args.interval:g} s\n(PSS every {args.interval * args.pss_every:g} s). "
        "idle: the second before the first sender; peak and median: while the senders\n"
        "ran. procs: most processes at once."
    )
    elapsed = time.monotonic() - started
    print(f"total {elapsed:.0f} s")
    report = {
        "benchmark": "node_memory",
        "associations": args.associations,
        "images_per_association": args.images,
        "files": count,
        "syntax": args.syntax,
        "rows": args.rows,
        "cols": args.cols,
        "mb_per_file": round(data.mean_mb, 2),
        "interval_s": args.interval,
        "pss_interval_s": round(args.interval * args.pss_every, 3),
        "repeat": args.repeat,
        "measured": measured_commit(),
        "environment": {**environment(), "dcmtk_tcp_nodelay": True},
        "runs": [asdict(r) for r in runs],
        "summary": summary,
        "total_seconds": round(elapsed, 1),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
