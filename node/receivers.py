"""Several receiving processes behind one DICOM port (``dicom.receiver_processes`` > 1).

All associations of one process share one interpreter, so a node that receives from
several senders at once is bound by one core. With ``dicom.receiver_processes`` = N > 1
the process the operator runs (the *parent*) listens on the DICOM port itself and
receives nothing: it accepts each connection, applies ``dicom.allowed_hosts`` and
``dicom.max_associations_per_host`` (for the whole node), and hands the connection (its
file descriptor, over a Unix socket pair) to the receiving process with the fewest open
connections. Each receiving process (a *receiver*: a fresh interpreter started with the
``spawn`` method, so it inherits no threads, locks or database connections) runs a
:class:`node.scp.StorageSCP` on the connections it is given: the peer limits, TLS, the
C-STORE handler, the spool, and a ledger connection of its own. A C-STORE is answered
Success only after its file and directory are fsynced and its row is committed, in
whichever process received it.

A receiver sends back over its socket pair: ``ready``, ``closed`` (a connection ended: its
per-host slot is free) and ``released`` (an association that stored into these study
versions ended: the parent's :class:`node.completion.StudyCoordinator` completes them, as
it does for its own SCP). C-STORE outcome counters live in shared memory, one row per
receiver, so ``/metrics`` counts every receiver's, a restarted one's included. Log records
go to the parent over the same socket pair (one message each: no lock shared between
processes that a killed receiver could leave held) and are written by its handlers.

``dicom.max_associations`` is shared out: each receiver accepts ceil(max / N)
associations; the parent hands each connection to the least busy one.

A receiver that dies is started again (after a pause that grows while it keeps dying
early). Its open associations end without a response to the C-STORE in flight, so their
senders send that file again: nothing answered Success is lost. The per-host slots of its
connections are freed and the partial files it was writing are removed; studies whose
association it held complete after ``completion.quiet_seconds`` instead of on release.
Stopping the parent stops the receivers (they also stop by themselves when the parent is
gone).
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import os
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, MutableSequence
from dataclasses import dataclass
from typing import Any

from node.datadir import PRIVATE_UMASK
from node.ledger import StudyLedger
from node.netlimits import HostSlots, admit_host
from node.scp import StorageSCP, StoreCounters, make_ssl_context
from node.settings import DicomSettings, Settings, StorageSettings
from node.spool import Spool

log = logging.getLogger("medgemma.receivers")


class ReceiverStartError(RuntimeError):
    """A receiving process did not start (the reason is in the log)."""


# a receiver that dies sooner than this after it started is started again after a pause
_EARLY_DEATH_SECONDS = 5.0
_MAX_RESTART_PAUSE = 30.0
_READY_SECONDS = 120.0  # a new interpreter imports pydicom, pynetdicom, SQLAlchemy
_STOP_SECONDS = 10.0
_MESSAGE_BYTES = 262144  # a report (log records: 8192 characters, JSON-escaped)
# the parent's sends to a receiver (connections) time out rather than block its accept loop
_SEND_SECONDS = 5.0
_COUNTER_CELLS = 3  # stored, duplicates, refused
_LOG_TEXT_CHARS = 8192  # a log message (with its traceback) sent to the parent, at most


class SharedStoreCounters(StoreCounters):
    """A receiver's C-STORE outcomes, kept in its row of the pool's shared memory."""

    def __init__(self, cells: MutableSequence[int], row: int) -> None:  # no dataclass init:
        self._cells = cells  # the row keeps what a previous receiver in it counted
        self._base = row * _COUNTER_CELLS

    @property
    def stored(self) -> int:
        return int(self._cells[self._base])

    @stored.setter
    def stored(self, value: int) -> None:
        self._cells[self._base] = value

    @property
    def duplicates(self) -> int:
        return int(self._cells[self._base + 1])

    @duplicates.setter
    def duplicates(self, value: int) -> None:
        self._cells[self._base + 1] = value

    @property
    def refused(self) -> int:
        return int(self._cells[self._base + 2])

    @refused.setter
    def refused(self, value: int) -> None:
        self._cells[self._base + 2] = value


def _message(event: str, **fields: Any) -> bytes:
    return json.dumps({"event": event, **fields}).encode()


class HandedConnections:
    """What a receiver's SCP listens on instead of a port: the connections its parent hands
    it over ``channel`` (``accept()`` like a listening socket; the server polls ``fileno()``)."""

    def __init__(self, channel: socket.socket, on_parent_gone: Callable[[], None]) -> None:
        self.channel = channel
        self.on_parent_gone = on_parent_gone

    def fileno(self) -> int:
        return self.channel.fileno()

    def accept(self) -> tuple[socket.socket, tuple[str, int]]:
        data, fds, _flags, _addr = socket.recv_fds(self.channel, _MESSAGE_BYTES, 1)
        if not fds:
            if not data:  # end of file: the parent is gone or stopping
                self.on_parent_gone()
            raise OSError("no connection handed over")
        client = socket.socket(fileno=fds[0])
        try:
            peer = json.loads(data)
            return client, (str(peer["host"]), int(peer["port"]))
        except (ValueError, KeyError, TypeError):
            client.close()
            raise OSError("malformed hand-over message") from None

    def shutdown(self, how: int) -> None:
        try:
            self.channel.shutdown(how)
        except OSError:
            pass  # the parent closed its side already

    def close(self) -> None:
        self.channel.close()

    def send(self, data: bytes) -> None:
        try:
            self.channel.send(data)
        except OSError:
            pass  # the parent is gone: this receiver stops (accept() sees end of file)


class _ParentLog(logging.Handler):
    """A receiver's log records, sent to the parent, whose handlers write them."""

    def __init__(self, connections: HandedConnections) -> None:
        super().__init__()
        self.connections = connections

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
            if record.exc_info:
                text += "\n" + logging.Formatter().formatException(record.exc_info)
            fields = {
                "name": record.name,
                "levelno": record.levelno,
                "levelname": record.levelname,
                "msg": text[:_LOG_TEXT_CHARS],
                "created": record.created,
                "msecs": record.msecs,
                "pathname": record.pathname,
                "filename": record.filename,
                "module": record.module,
                "lineno": record.lineno,
                "funcName": record.funcName,
                "process": record.process,
                "processName": record.processName,
                "thread": record.thread,
                "threadName": record.threadName,
            }
            self.connections.send(_message("log", record=fields))
        except Exception:
            self.handleError(record)


class _ParentSlots(HostSlots):
    """A receiver's per-host accounting: the parent counted the connection when it accepted
    it; a connection that ends is reported to the parent, which frees its slot."""

    def __init__(self, connections: HandedConnections) -> None:
        super().__init__(1)
        self.connections = connections

    def acquire(self, host: str) -> bool:
        return True

    def release(self, host: str) -> None:
        self.connections.send(_message("closed", host=host))


@dataclass(frozen=True)
class _ReceiverArgs:
    """What a receiver needs (Settings itself does not pickle: load_settings subclasses it)."""

    dicom: DicomSettings
    storage: StorageSettings
    run_lease_seconds: float
    max_run_seconds: float
    row: int
    log_level: int


def _receiver_main(
    args: _ReceiverArgs, channel: socket.socket, cells: MutableSequence[int]
) -> None:
    """A receiving process: serve the connections the parent hands over until it is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent, which stops us
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    os.umask(PRIVATE_UMASK)
    channel.settimeout(_SEND_SECONDS)  # a parent that reads nothing does not stall a sender
    connections = HandedConnections(channel, stop.set)
    root = logging.getLogger()
    root.handlers[:] = [_ParentLog(connections)]
    root.setLevel(args.log_level)
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    storage = args.storage
    spool = Spool(storage.spool_path, storage.min_free_mb * 2**20, receive_dir=storage.receive_path)
    ledger = StudyLedger(
        storage.resolved_database_url(),
        run_lease_seconds=args.run_lease_seconds,
        max_run_seconds=args.max_run_seconds,
    )

    def released(study_ids: set[int], host: str) -> None:
        connections.send(_message("released", study_ids=sorted(study_ids), host=host))

    scp = StorageSCP(args.dicom, spool, ledger, on_release=released)
    scp.counters = SharedStoreCounters(cells, args.row)
    try:
        scp.start(handed=connections, slots=_ParentSlots(connections))
        connections.send(_message("ready"))
        stop.wait()
    finally:
        scp.stop()
        ledger.close()


def receiver_dicom(dicom: DicomSettings, port: int | None = None) -> DicomSettings:
    """A receiver's DICOM settings: its share of ``dicom.max_associations``; ``port``: the
    one the parent listens on (for the receiver's log lines)."""
    share = max(1, math.ceil(dicom.max_associations / dicom.receiving_processes))
    update: dict[str, Any] = {"max_associations": share}
    if port is not None:
        update["port"] = port
    return dicom.model_copy(update=update)


class _Receiver:
    """The parent's view of one receiving process."""

    def __init__(self, row: int) -> None:
        self.row = row
        self.process: Any = None
        self.channel: socket.socket | None = None
        self.ready = threading.Event()
        self.started = 0.0
        self.open = 0  # connections handed over and not reported closed
        self.handed = 0  # connections handed over since the pool started
        self.hosts: Counter[str] = Counter()
        self.pause = 1.0


class ReceiverPool:
    """The parent side: the listening socket, the receivers, and what they report."""

    def __init__(
        self, settings: Settings, on_release: Callable[[set[int], str], None] | None = None
    ) -> None:
        self.settings = settings
        self.on_release = on_release
        self.processes = settings.dicom.receiving_processes
        self._context = multiprocessing.get_context("spawn")
        self._cells: Any = self._context.RawArray("q", self.processes * _COUNTER_CELLS)
        self._receivers = [_Receiver(row) for row in range(self.processes)]
        self._slots = HostSlots(settings.dicom.max_associations_per_host)
        self._allowed = frozenset(settings.dicom.allowed_hosts)
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._started = False  # every receiver was ready once: a death now is restarted
        self._start_failed = threading.Event()
        self._sock: socket.socket | None = None
        self._threads: list[threading.Thread] = []

    # --- what /metrics and the runtime read -----------------------------------------------

    @property
    def counters(self) -> StoreCounters:
        """The C-STORE outcomes of every receiver, restarted ones included."""
        cells = list(self._cells)
        total = StoreCounters()
        for row in range(self.processes):
            base = row * _COUNTER_CELLS
            total.stored += cells[base]
            total.duplicates += cells[base + 1]
            total.refused += cells[base + 2]
        return total

    @property
    def port(self) -> int:
        if self._sock is None:
            raise RuntimeError("the SCP is not running")
        return int(self._sock.getsockname()[1])

    def pids(self) -> list[int | None]:
        """Each receiver's process id (None while it is being started again)."""
        with self._lock:
            return [
                r.process.pid if r.process is not None and r.ready.is_set() else None
                for r in self._receivers
            ]

    def open_connections(self) -> list[int]:
        with self._lock:
            return [r.open for r in self._receivers]

    def host_connections(self, host: str) -> int:
        """Connections from ``host`` open now, in every receiver (the parent counts each
        from its accept to the receiver's report that it closed)."""
        return self._slots.open_connections(host)

    def handed_connections(self) -> list[int]:
        with self._lock:
            return [r.handed for r in self._receivers]

    # --- lifecycle -----------------------------------------------------------------------

    def start(self) -> tuple[str, int]:
        """Listen, start the receivers and wait until each is ready. Returns (host, port).
        OSError when the port cannot be bound; RuntimeError when a receiver does not start."""
        dicom = self.settings.dicom
        make_ssl_context(dicom.tls)  # a TLS setting that is wrong fails here, not in each receiver
        family = socket.AF_INET6 if ":" in dicom.bind_address else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((dicom.bind_address, dicom.port))
            sock.listen(128)
        except OSError:
            sock.close()
            raise
        sock.settimeout(0.5)  # the accept loop looks at the stop flag this often
        self._sock = sock
        for receiver in self._receivers:
            self._spawn(receiver)
        deadline = time.monotonic() + _READY_SECONDS
        for receiver in self._receivers:
            while not receiver.ready.wait(0.1):
                if self._start_failed.is_set() or time.monotonic() > deadline:
                    self.stop()
                    raise ReceiverStartError(
                        f"receiving process {receiver.row} did not start "
                        f"(within {_READY_SECONDS:.0f} s); see the log above"
                    )
        self._started = True
        accept = threading.Thread(target=self._accept_loop, name="medgemma-scp", daemon=True)
        accept.start()
        self._threads.append(accept)
        host, port = sock.getsockname()[:2]
        log.info(
            "DICOM SCP %s listening on %s:%d (%d receiving processes, max %d associations "
            "each%s%s)",
            dicom.ae_title,
            host,
            port,
            self.processes,
            receiver_dicom(dicom).max_associations,
            ", TLS" if dicom.tls.enabled else "",
            f", callers {dicom.allowed_callers}" if dicom.allowed_callers else "",
        )
        return str(host), int(port)

    def stop(self) -> None:
        """Stop accepting, then stop the receivers (their open associations are aborted)."""
        self._stopping.set()
        if self._sock is not None:
            self._sock.close()
        with self._lock:
            receivers = list(self._receivers)
        for receiver in receivers:
            if receiver.channel is not None:
                try:  # end of file on its side: the receiver stops
                    receiver.channel.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        deadline = time.monotonic() + _STOP_SECONDS
        for receiver in receivers:
            process = receiver.process
            if process is None:
                continue
            process.join(max(0.1, deadline - time.monotonic()))
            if process.is_alive():
                log.warning("receiving process %d did not stop: killed", process.pid)
                process.kill()
                process.join(5)
        for thread in self._threads:
            thread.join(timeout=_STOP_SECONDS)
        self._threads.clear()
        self._sock = None

    # --- receivers -----------------------------------------------------------------------

    def _spawn(self, receiver: _Receiver) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        args = _ReceiverArgs(
            dicom=receiver_dicom(self.settings.dicom, self.port),
            storage=self.settings.storage,
            run_lease_seconds=self.settings.queue.run_lease_seconds,
            max_run_seconds=self.settings.queue.task_time_limit_seconds,
            row=receiver.row,
            log_level=logging.getLogger().getEffectiveLevel(),
        )
        process = self._context.Process(
            target=_receiver_main,
            args=(args, theirs, self._cells),
            name=f"medgemma-rx-{receiver.row}",
            daemon=True,
        )
        process.start()
        theirs.close()
        ours.settimeout(_SEND_SECONDS)
        with self._lock:
            receiver.process = process
            receiver.channel = ours
            receiver.ready.clear()
            receiver.started = time.monotonic()
        thread = threading.Thread(
            target=self._read_reports,
            args=(receiver, process, ours),
            name=f"medgemma-rx-{receiver.row}-reports",
            daemon=True,
        )
        thread.start()
        self._threads.append(thread)

    def _read_reports(self, receiver: _Receiver, process: Any, channel: socket.socket) -> None:
        """What one receiver reports, until it ends; then start it again (unless stopping)."""
        while True:
            try:
                data = channel.recv(_MESSAGE_BYTES)
            except TimeoutError:
                continue
            except OSError:
                break
            if not data:
                break
            try:
                self._report(receiver, json.loads(data))
            except Exception:
                log.exception("report of receiving process %d not handled", process.pid)
        channel.close()
        process.join(_STOP_SECONDS)
        self._ended(receiver, process)

    def _report(self, receiver: _Receiver, message: dict[str, Any]) -> None:
        event = message.get("event")
        if event == "log":
            record = logging.makeLogRecord(message["record"])
            logging.getLogger(record.name).handle(record)
        elif event == "ready":
            receiver.ready.set()
        elif event == "closed":
            host = str(message["host"])
            with self._lock:
                receiver.open -= 1
                receiver.hosts[host] -= 1
                if receiver.hosts[host] <= 0:
                    del receiver.hosts[host]
            self._slots.release(host)
        elif event == "released" and self.on_release is not None:
            self.on_release({int(i) for i in message["study_ids"]}, str(message["host"]))

    def _ended(self, receiver: _Receiver, process: Any) -> None:
        with self._lock:
            lost = receiver.hosts
            receiver.hosts = Counter()
            receiver.open = 0
            receiver.ready.clear()
            receiver.channel = None
            lived = time.monotonic() - receiver.started
        for host, count in lost.items():
            for _ in range(count):
                self._slots.release(host)
        self._remove_partial_files(process.pid)
        if self._stopping.is_set():
            return
        if not self._started:  # it failed to start: start() reports it, no restart loop
            log.error(
                "receiving process %d (pid %s) exited with code %s before it was ready",
                receiver.row,
                process.pid,
                process.exitcode,
            )
            self._start_failed.set()
            return
        open_connections = sum(lost.values())
        log.error(
            "receiving process %d (pid %s) ended with exit code %s; its %d open "
            "connections were dropped (their senders get no response for the file in "
            "flight and send it again); starting it again",
            receiver.row,
            process.pid,
            process.exitcode,
            open_connections,
        )
        if lived < _EARLY_DEATH_SECONDS:
            self._stopping.wait(receiver.pause)
            receiver.pause = min(receiver.pause * 2, _MAX_RESTART_PAUSE)
        else:
            receiver.pause = 1.0
        if not self._stopping.is_set():
            try:
                self._spawn(receiver)
            except Exception:
                log.exception("receiving process %d could not be started again", receiver.row)

    def _remove_partial_files(self, pid: int | None) -> None:
        """Remove what an ended receiver was still receiving (node.scp names the files it
        receives into ``rx-<pid>-...``); at the node's next start they would go anyway."""
        if pid is None:
            return
        removed = 0
        for path in self.settings.storage.receive_path.glob(f"rx-{pid}-*"):
            try:
                path.unlink()
                removed += 1
            except OSError as exc:
                log.warning("partial file %s not removed: %s", path.name, exc.strerror or exc)
        if removed:
            log.warning("removed %d partial files of receiving process %d", removed, pid)

    # --- the listening socket ----------------------------------------------------------------

    def _accept_loop(self) -> None:
        sock = self._sock
        assert sock is not None
        while not self._stopping.is_set():
            try:
                client, address = sock.accept()
            except TimeoutError:
                continue
            except OSError as exc:
                if self._stopping.is_set():
                    return
                log.error("accepting a DICOM connection failed: %s", exc.strerror or exc)
                time.sleep(0.1)  # e.g. out of file descriptors: do not spin
                continue
            self._admit(client, address)

    def _admit(self, client: socket.socket, address: Any) -> None:
        host = str(address[0])
        if not admit_host(host, self._allowed, self._slots):
            client.close()
            return
        message = json.dumps({"host": host, "port": int(address[1])}).encode()
        with self._lock:
            candidates = sorted(
                (r for r in self._receivers if r.ready.is_set() and r.channel is not None),
                key=lambda r: (r.open, r.handed),
            )
        for receiver in candidates:
            channel = receiver.channel
            if channel is None:
                continue
            with self._lock:
                if receiver.channel is not channel:  # it ended meanwhile
                    continue
                receiver.open += 1
                receiver.handed += 1
                receiver.hosts[host] += 1
            try:
                socket.send_fds(channel, [message], [client.fileno()])
            except OSError:
                with self._lock:  # it died meanwhile: its reader starts it again
                    counted = receiver.channel is channel
                    if counted:
                        receiver.open -= 1
                        receiver.handed -= 1
                        receiver.hosts[host] -= 1
                # not counted: its end freed this connection's slot with its own
                if not counted and not self._slots.acquire(host):
                    client.close()
                    return
                continue
            client.close()  # the receiver holds its own copy now
            return
        log.error("no receiving process could take a connection from %s: closed", host)
        client.close()
        self._slots.release(host)
